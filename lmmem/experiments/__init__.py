"""Experiments that reproduce comparisons end to end (prepare → train → evaluate → results page)."""
