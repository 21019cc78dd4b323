"""Triton kernels, each beside the plain-PyTorch reference the tests compare it against.

* :mod:`lmmem.kernels.linear_cross_entropy` — fused linear + cross-entropy (forward by an online
  log-sum-exp over vocabulary tiles, backward by recomputing logit tiles; no ``N × V`` logits);
  reference :func:`~lmmem.kernels.linear_cross_entropy.linear_cross_entropy_reference`.
* :mod:`lmmem.kernels.hebbian` — the Hebbian softmax's batch statistics (scatter kernel into
  ``N``-slot buffers, no host sync) and its in-place row update; reference
  :func:`lmmem.output_layers.hebbian_softmax.hebbian_update_reference`.

The output layers dispatch to them (``backend="auto"``: Triton for CUDA tensors); importing this
package does not import triton (the submodules do, so ``TRITON_INTERPRET`` can still be set first).
"""
