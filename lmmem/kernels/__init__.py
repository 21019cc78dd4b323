"""Fused output-layer operations, each beside the plain-PyTorch reference the tests compare it against.

Layered as Liger-Kernel: Triton kernel → launcher (with the PyTorch statement of the same step
beside it) → the operation → the output layers of :mod:`lmmem.output_layers`, which import from
here, never the other way round.

* :mod:`lmmem.kernels.linear_cross_entropy` — chunked fused linear + cross-entropy (per chunk of
  rows: logits by one matmul, an in-place step to loss / log-sum-exp / logit gradient, two matmuls
  for the gradients; no ``N × V`` buffer, no atomics, deterministic; label smoothing, z-loss and
  soft-capping), on any device; reference
  :func:`~lmmem.kernels.linear_cross_entropy.linear_cross_entropy_reference`.
* :mod:`lmmem.kernels.loss` — the same as a Liger-style loss object,
  :class:`~lmmem.kernels.loss.LinearCrossEntropyLoss` (options fixed at construction, the output
  matrix given with each call; ``return_z_loss``).
* :mod:`lmmem.kernels.ce_step` — that in-place step: the Triton launcher and its PyTorch statement.
* :mod:`lmmem.kernels.hebbian_rule` — the Hebbian softmax's rule in plain PyTorch (λ schedule, the
  paper's and the centred row update, merging per-class statistics) and its float64 reference
  :func:`~lmmem.kernels.hebbian_rule.hebbian_update_reference`.
* :mod:`lmmem.kernels.hebbian` — the rule's GPU bookkeeping: batch statistics (a deterministic
  segmented sum over the sort of the targets, into ``N``-slot buffers, no host sync) and the
  paper rule's in-place row update.
* :mod:`lmmem.kernels.hebbian_centred` — the centred rule's step (running mean, running row norm,
  the write; λ an input), four kernels with no host sync, beside its PyTorch statement.
* :mod:`lmmem.kernels.triton_kernels` — the Triton kernels themselves (torch-free, so that
  ``benchmarks/compile_check.py`` can compile them for sm_80 / sm_90a without a GPU).
* :mod:`lmmem.kernels.ivf_scan` — the native (C++) exact scan of an IVF index's probed lists for
  kNN-LM on a CPU, built on first use and probed, beside its torch statement
  :mod:`lmmem.memories.knn_scan`, which runs wherever it does not build.
* :mod:`lmmem.kernels.runtime` — when Triton runs, and the fallback that keeps a failing kernel
  variant from ever stopping a run (probe on first use, warn once, PyTorch path).

Importing this package does not import triton (the submodules do, so ``TRITON_INTERPRET`` can
still be set first).
"""
