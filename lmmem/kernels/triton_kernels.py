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
* ``mix_kernel`` — the Hebbian row update (the paper's rule), one program per class present.
* ``centred_mean_kernel``, ``centred_row_kernel``, ``centred_norm_kernel``, ``centred_mix_kernel``
  — the centred rule's step (running mean, the rows' parts along and orthogonal to it, running
  norm, the write); the maths and the order are in :mod:`lmmem.kernels.hebbian_centred`.
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

    @triton.jit
    def _inv_norm(sq):
        # 1/|x| from |x|², and 0 for the zero vector (so u = μ/|μ| is 0 while μ = 0, as the reference)
        norm = tl.sqrt(sq)
        return tl.where(norm > 0, 1.0 / tl.maximum(norm, 1e-30), 0.0)

    @triton.jit
    def _running_rate(updates_ptr, min_rate):
        # max(1 − β, 1/(k+1)), k = the updates before this one: a plain mean first, then the EMA
        k = tl.load(updates_ptr)
        return tl.maximum(min_rate, 1.0 / (k.to(tl.float32) + 1.0))

    @triton.jit
    def centred_mean_kernel(ids_ptr, n_ptr, sums_ptr, mu_ptr, mu_out_ptr, updates_ptr, S, V, D, min_rate,
                            BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Columns ``[pid·BLOCK_D, …)`` of the new running mean: ``μ + r·(Σ sums / Σ n − μ)`` over the
        real slots (id < V), into ``mu_out``; μ itself where the batch has no real token. The slots
        are summed tile by tile, then by one tree sum: a fixed order (deterministic, no atomics)."""
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        tot = tl.zeros((BLOCK_S,), dtype=tl.int64)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            cls = tl.load(ids_ptr + offs_s, mask=offs_s < S, other=V)
            real = (offs_s < S) & (cls < V)
            tot += tl.load(n_ptr + offs_s, mask=real, other=0)
            ptrs = sums_ptr + offs_s.to(tl.int64)[:, None] * D + offs_d[None, :]
            acc += tl.load(ptrs, mask=real[:, None] & mask_d[None, :], other=0.0)
        total = tl.sum(tot, axis=0)
        batch_mean = tl.sum(acc, axis=0) / tl.maximum(total, 1).to(tl.float32)
        rate = _running_rate(updates_ptr, min_rate)
        mu = tl.load(mu_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        new = tl.where(total > 0, mu + rate * (batch_mean - mu), mu)
        tl.store(mu_out_ptr + offs_d, new.to(mu_out_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def centred_row_kernel(w_ptr, ids_ptr, mu_ptr, along_ptr, perp_ptr, V, D, stride_wv, stride_wd,
                           BLOCK_D: tl.constexpr):
        """Slot ``s`` of a real class ``i``: ``along[s] = θ̂_i·u`` and ``perp[s] = |θ̂_i − (θ̂_i·u)·u|``
        for ``u = μ/|μ|`` (the new μ). The orthogonal norm has a pass of its own: ``|θ̂|² − along²``
        would cancel for a row that lies mostly along μ."""
        slot = tl.program_id(0).to(tl.int64)
        cls = tl.load(ids_ptr + slot)
        if cls < V:
            row_ptr = w_ptr + cls * stride_wv
            mu_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
            dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs < D
                mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
                row = tl.load(row_ptr + offs * stride_wd, mask=m, other=0.0).to(tl.float32)
                mu_sq += mu * mu
                dot += row * mu
            inv = _inv_norm(tl.sum(mu_sq, axis=0))
            along = tl.sum(dot, axis=0) * inv
            sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs < D
                mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
                row = tl.load(row_ptr + offs * stride_wd, mask=m, other=0.0).to(tl.float32)
                p = row - (along * inv) * mu
                sq += p * p
            tl.store(along_ptr + slot, along)
            tl.store(perp_ptr + slot, tl.sqrt(tl.sum(sq, axis=0)))

    @triton.jit
    def centred_norm_kernel(ids_ptr, n_ptr, perp_ptr, norm_ptr, norm_out_ptr, updates_ptr, S, V, min_rate,
                            BLOCK_S: tl.constexpr):
        """One program: the new running row norm ``ρ + r·(Σ n_s·perp_s / Σ n_s − ρ)`` over the real
        slots (token-weighted), into ``norm_out``; ρ itself where the batch has no real token."""
        wsum = tl.zeros((BLOCK_S,), dtype=tl.float32)
        tot = tl.zeros((BLOCK_S,), dtype=tl.int64)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            cls = tl.load(ids_ptr + offs_s, mask=offs_s < S, other=V)
            real = (offs_s < S) & (cls < V)
            n = tl.load(n_ptr + offs_s, mask=real, other=0)
            wsum += n.to(tl.float32) * tl.load(perp_ptr + offs_s, mask=real, other=0.0)
            tot += n
        total = tl.sum(tot, axis=0)
        batch = tl.sum(wsum, axis=0) / tl.maximum(total, 1).to(tl.float32)
        rate = _running_rate(updates_ptr, min_rate)
        rho = tl.load(norm_ptr).to(tl.float32)
        new = tl.where(total > 0, rho + rate * (batch - rho), rho)
        tl.store(norm_out_ptr, new.to(norm_out_ptr.dtype.element_ty))

    @triton.jit
    def centred_mix_kernel(w_ptr, class_counts_ptr, ids_ptr, n_ptr, sums_ptr, lam_ptr, mu_ptr, norm_ptr, along_ptr,
                           perp_ptr, updates_ptr, start_step, V, D, stride_wv, stride_wd,
                           WRITE_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Slot ``s`` of a real class ``i``, once ``updates ≥ start_step`` and where ``λ_s ≠ 0``:
        ``θ_i ← λ_s·((θ̂_i·u)·u + scale·P(h̄_i − μ)) + (1 − λ_s)·θ̂_i`` in place (fp32, stored in the
        weight's dtype), ``scale`` by ``WRITE_NORM`` (0: none, 1: the row's ``perp``, 2: the running
        norm, each over ``|P(h̄_i − μ)|``); then ``c_i += n_s``. Three passes over the row: |μ| and
        (h̄ − μ)·μ, then |P(h̄ − μ)|, then the write."""
        slot = tl.program_id(0).to(tl.int64)
        cls = tl.load(ids_ptr + slot)
        if cls < V:
            n = tl.load(n_ptr + slot)
            lam = tl.load(lam_ptr + slot)
            if (tl.load(updates_ptr) >= start_step) & (lam != 0.0):
                row_ptr = w_ptr + cls * stride_wv
                sums_row = sums_ptr + slot * D
                inv_n = 1.0 / n.to(tl.float32)
                mu_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    m = offs < D
                    mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    w = tl.load(sums_row + offs, mask=m, other=0.0) * inv_n - mu
                    mu_sq += mu * mu
                    dot += w * mu
                inv = _inv_norm(tl.sum(mu_sq, axis=0))
                w_u = tl.sum(dot, axis=0) * inv * inv  # (h̄ − μ)·u / |μ|: the multiple of μ to remove
                sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    m = offs < D
                    mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    w = tl.load(sums_row + offs, mask=m, other=0.0) * inv_n - mu
                    w = w - w_u * mu
                    sq += w * w
                w_norm = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), 1e-12)
                if WRITE_NORM == 0:
                    scale = 1.0
                elif WRITE_NORM == 1:
                    scale = tl.load(perp_ptr + slot) / w_norm
                else:
                    scale = tl.load(norm_ptr).to(tl.float32) / w_norm
                along = tl.load(along_ptr + slot) * inv  # θ̂·u / |μ|: the multiple of μ the row keeps
                for d0 in range(0, D, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    m = offs < D
                    ptrs = row_ptr + offs * stride_wd
                    row = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
                    mu = tl.load(mu_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    w = tl.load(sums_row + offs, mask=m, other=0.0) * inv_n - mu
                    target = along * mu + scale * (w - w_u * mu)
                    # λ·target + (1−λ)·θ̂, as the reference (exact at λ = 1)
                    tl.store(ptrs, (lam * target + (1.0 - lam) * row).to(w_ptr.dtype.element_ty), mask=m)
            c = tl.load(class_counts_ptr + cls)
            tl.store(class_counts_ptr + cls, c + n)


# Launch parameters shipped for CUDA (the compile check compiles exactly these). The step is
# memory-bound: a row of V = 267,735 bf16 logits is 0.5 MB read twice and written once.
CE_STEP_CUDA = {"BLOCK_V": 4096, "num_warps": 16}
CE_STEP_INTERPRETER = {"BLOCK_V": 32, "num_warps": 1}  # small: odd shapes exercise the masks
SEGMENT_SUM_CUDA = {"BLOCK_D": 128, "num_warps": 4}
SEGMENT_SUM_INTERPRETER = {"BLOCK_D": 16, "num_warps": 1}
MIX_CUDA = {"BLOCK_D_MAX": 1024, "num_warps": 4}
MIX_INTERPRETER = {"BLOCK_D_MAX": 16, "num_warps": 1}
# The centred rule's step: the two reductions over the slots tile BLOCK_S × BLOCK_D (one program per
# column block; one program for the norm), the per-slot kernels take a row in one block up to 1024.
CENTRED_CUDA = {"BLOCK_S": 64, "BLOCK_D": 32, "BLOCK_D_MAX": 1024, "num_warps": 4}
CENTRED_INTERPRETER = {"BLOCK_S": 8, "BLOCK_D": 16, "BLOCK_D_MAX": 16, "num_warps": 1}
# centred_mix_kernel's WRITE_NORM codes, by the layer's write_norm names
CENTRED_WRITE_NORMS = {"none": 0, "row": 1, "running": 2}
