"""Kernels: filled by later issues (see README's roadmap)."""
