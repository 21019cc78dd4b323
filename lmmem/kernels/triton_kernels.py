"""Every Triton kernel lmmem ships, in one module that imports triton and nothing else.

Keeping them free of torch lets ``benchmarks/compile_check.py`` compile each one for sm_80 / sm_90a
in a small venv holding only the GPU machines' triton version, and lets the launchers
(:mod:`lmmem.kernels.linear_cross_entropy`, :mod:`lmmem.kernels.hebbian`) stay plain Python.
The plain-PyTorch statement of each kernel sits beside its launcher, and the tests compare them.

* ``ce_step_kernel`` — the in-place step of the chunked linear cross-entropy: one program per
  row of a chunk of logits; two passes over the row (an online max / Σexp, then the gradient),
  no atomics, no ``tl.dot`` (the three matmuls around it are cuBLAS's).
* ``segment_sum_kernel`` — the Hebbian statistics: per class present, the fp32 sum of the
  activations that predicted it, read through the sort order (a segmented sum: deterministic,
  no atomics).
* ``mix_kernel`` — the Hebbian row update, one program per class present.
"""

from __future__ import annotations

try:  # triton is a Linux-only dependency; the PyTorch paths work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from one exp, exact in the tails (e → 0) and never overflowing; tl has no tanh that
        # works on every triton version and in the interpreter
        e = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def ce_step_kernel(
        z_ptr, stride_z, t_ptr, w_ptr, loss_ptr, lse_ptr,
        V, ignore_index, smoothing, z_loss, softcap,
        HAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Row ``r`` of the logits ``z`` (``C × V``, fp32/bf16/fp16): writes the row's loss and
        log-sum-exp (fp32) and, with ``HAS_GRAD``, overwrites the row with ``w_r · ∂loss_r/∂z``.

        loss = lse − (1−ε)·z_t − ε·mean(z) + λ·lse²   (z after the soft-cap ``c·tanh(z/c)``)
        ∂/∂z_v = [p_v·(1 + 2λ·lse) − (1−ε)·1[v = t] − ε/V] · (1 − (z_v/c)²)

        All in fp32; the target's −1 is folded in before the result is rounded to the logits'
        dtype (rounding p first would lose it for a confident prediction). Ignored rows: loss 0,
        and their weight ``w`` is 0 so their gradient row is 0."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        t = tl.load(t_ptr + row).to(tl.int64)
        valid = t != ignore_index
        t_safe = tl.where(valid, t, 0)
        cols0 = tl.arange(0, BLOCK_V)
        m_vec = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        s_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)
        z_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z_sum += tl.where(mask, z, 0.0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m_vec, z)
            # a lane that has only seen padding is −inf: keep exp() away from (−inf) − (−inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(z - m_safe)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
        z_t = tl.load(base + t_safe).to(tl.float32)
        if SOFTCAP:
            z_t = softcap * _tanh(z_t / softcap)
        loss = lse - (1.0 - smoothing) * z_t - smoothing * tl.sum(z_sum, axis=0) / V + z_loss * lse * lse
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)
        if HAS_GRAD:
            w = tl.load(w_ptr + row).to(tl.float32)
            w = tl.where(valid, w, 0.0)
            a = w * (1.0 + 2.0 * z_loss * lse)
            off = w * smoothing / V
            hit = w * (1.0 - smoothing)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                mask = cols < V
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                g = a * tl.exp(z - lse) - off - tl.where(cols == t_safe, hit, 0.0)
                if SOFTCAP:
                    zc = z / softcap
                    g = g * (1.0 - zc * zc)
                tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def segment_sum_kernel(h_ptr, order_ptr, start_ptr, sums_ptr, D, stride_hn, stride_hd,
                           BLOCK_D: tl.constexpr):
        """Slot ``u``: ``sums[u] = Σ h[order[i]]`` for ``i`` in ``[start[u], start[u+1])`` — the rows
        of one class, contiguous in the sort order — summed in fp32 in a fixed order (deterministic;
        no atomics). Empty slots (past the last class) write zeros."""
        slot = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        begin = tl.load(start_ptr + slot)
        end = tl.load(start_ptr + slot + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(begin, end):
            r = tl.load(order_ptr + i).to(tl.int64)
            acc += tl.load(h_ptr + r * stride_hn + offs_d * stride_hd, mask=mask_d, other=0.0).to(tl.float32)
        tl.store(sums_ptr + slot * D + offs_d, acc, mask=mask_d)

    @triton.jit
    def mix_kernel(w_ptr, class_counts_ptr, ids_ptr, n_ptr, sums_ptr, V, D, stride_wv, stride_wd,
                   gamma, limit, HAS_LIMIT: tl.constexpr, RESCALE: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per slot; see :func:`lmmem.kernels.hebbian.hebbian_mix_triton_`."""
        slot = tl.program_id(0).to(tl.int64)
        cls = tl.load(ids_ptr + slot)
        if cls < V:
            n = tl.load(n_ptr + slot)
            c = tl.load(class_counts_ptr + cls)
            lam = tl.maximum(1.0 / (c.to(tl.float32) + 1.0), gamma)
            if HAS_LIMIT:
                lam = tl.where(c.to(tl.float32) < limit, lam, 0.0)
            inv_n = 1.0 / n.to(tl.float32)
            scale = 1.0
            if RESCALE:
                row_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                mean_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    m = offs < D
                    row = tl.load(w_ptr + cls * stride_wv + offs * stride_wd, mask=m, other=0.0).to(tl.float32)
                    mean = tl.load(sums_ptr + slot * D + offs, mask=m, other=0.0) * inv_n
                    row_sq += row * row
                    mean_sq += mean * mean
                scale = tl.sqrt(tl.sum(row_sq, axis=0)) / tl.maximum(tl.sqrt(tl.sum(mean_sq, axis=0)), 1e-12)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs < D
                ptrs = w_ptr + cls * stride_wv + offs * stride_wd
                row = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
                mean = tl.load(sums_ptr + slot * D + offs, mask=m, other=0.0) * inv_n * scale
                # λ·h̄ + (1−λ)·θ̂, exact at λ = 1 and λ = 0 (as the reference)
                tl.store(ptrs, (lam * mean + (1.0 - lam) * row).to(w_ptr.dtype.element_ty), mask=m)
            tl.store(class_counts_ptr + cls, c + n)


# Launch parameters shipped for CUDA (the compile check compiles exactly these). The step is
# memory-bound: a row of V = 267,735 bf16 logits is 0.5 MB read twice and written once.
CE_STEP_CUDA = {"BLOCK_V": 4096, "num_warps": 16}
CE_STEP_INTERPRETER = {"BLOCK_V": 32, "num_warps": 1}  # small: odd shapes exercise the masks
SEGMENT_SUM_CUDA = {"BLOCK_D": 128, "num_warps": 4}
SEGMENT_SUM_INTERPRETER = {"BLOCK_D": 16, "num_warps": 1}
MIX_CUDA = {"BLOCK_D_MAX": 1024, "num_warps": 4}
MIX_INTERPRETER = {"BLOCK_D_MAX": 16, "num_warps": 1}
