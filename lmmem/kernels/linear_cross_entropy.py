"""Fused linear + cross-entropy in Triton: the loss of ``softmax(h Wᵀ + b)`` and its gradients for
``h``, ``W`` and ``b`` without ever storing the ``N × V`` logits.

At WikiText-103 scale (V = 267,735, N = 8,192 tokens a step) the logits are 2.2 billion numbers
(4.4 GB in bf16, and as much again for their gradient); here they only ever exist as
``BLOCK_N × BLOCK_V`` tiles in registers.

Layers (as in Liger-Kernel): Triton kernels (``_forward_kernel``, ``_backward_kernel``) →
launchers (:func:`linear_cross_entropy_forward`, :func:`linear_cross_entropy_backward`) →
:class:`LinearCrossEntropyFunction` (autograd) → :func:`linear_cross_entropy` (reduction,
autocast) → the output layers' ``backend="triton"``. :func:`linear_cross_entropy_reference` is the
plain-PyTorch statement the tests compare against.

Forward
-------
Grid ``(⌈N / BLOCK_N⌉, S)``: program ``(i, s)`` owns rows ``i·BLOCK_N …`` and the ``s``-th of ``S``
contiguous ranges of vocabulary tiles. For every tile it accumulates the logits over ``D`` in fp32
(``tl.dot``), adds the bias, and folds the tile into a running (max, Σ exp) — the online
log-sum-exp — and picks out the target's logit where the tile holds it. Each program writes its
partial (max, Σ exp, target logit) for its rows; a few ``(N, S)`` torch ops combine the partials
into ``lse`` and ``loss = lse − z_target`` (0 where ignored). Splitting the vocabulary gives enough
programs to fill the GPU when ``N / BLOCK_N`` alone would not.

Backward
--------
Grid ``(⌈N / BLOCK_N⌉, ⌈V / BLOCK_V⌉)``: each program recomputes its logit tile, forms
``G = g_n · (exp(z − lse_n) − 1[v = t_n])`` in fp32 — the −1 of the target is folded in *before*
any rounding to bf16, which would otherwise lose it for confident predictions — and then, one
``BLOCK_D`` slice at a time, adds ``G W`` into ``dh`` and ``Gᵀ h`` into ``dW`` and the column sums
of ``G`` into ``db``, all with fp32 atomics into fp32 buffers (cast to the inputs' dtypes at the
end; bf16 accumulators would drift). ``g_n`` is the upstream gradient of row ``n`` (0 for ignored
rows, and for the padding rows of the last block), so ``mean``/``sum``/``none`` reductions all reach
the kernel as one per-row scale, computed on the device (no ``.item()``, no host sync anywhere).
The fp32 atomics make the gradients' low bits depend on the order the GPU runs the programs in
(not bitwise deterministic run to run); the float64 tests bound the error.

Other properties designed in: offsets are computed in int64 (``V·D`` is 137M at D = 512 and passes
2³¹ at D ≥ 8,021; ``N·V`` passes it at N ≥ 8,021), inputs may be non-contiguous (strides are
passed), any mix of fp32/bf16/fp16 inputs is accepted with fp32 accumulation (``compute_dtype``
sets the dtype fed to the tensor cores: bf16 under autocast, tf32 for fp32 when PyTorch allows
tf32 matmuls), and a mean over a batch whose targets are all ignored is 0 with zero gradients.

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is imported): slow and fp32-only, which is what the CPU tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmmem.kernels.runtime import launch, require_triton, tl, triton

IGNORE_INDEX = -100


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters. The CUDA defaults are a starting point chosen for H100-class
    GPUs, not tuned by measurement (see the issue notes); the interpreter uses small tiles so that odd
    shapes exercise the masks."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    backward_block_n: int = 64
    backward_block_v: int = 64
    backward_num_warps: int = 8
    programs_per_sm: int = 4  # forward: vocabulary splits are added until about this many programs per SM


INTERPRETER_CONFIG = KernelConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1,
                                  backward_block_n=16, backward_block_v=32, backward_num_warps=1, programs_per_sm=1)


def default_config(device: torch.device) -> KernelConfig:
    return KernelConfig() if device.type == "cuda" else INTERPRETER_CONFIG


if triton is not None:

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, rows, mask_n, cols, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """``h[rows] · W[cols]ᵀ`` as a (BLOCK_N, BLOCK_V) fp32 tile (masked rows/cols give 0)."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(COMPUTE_DTYPE)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(COMPUTE_DTYPE)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _forward_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, max_ptr, sum_ptr, target_ptr,
        N, D, V, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t,
        tiles_per_split, num_splits, ignore_index,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        tgt = tl.load(t_ptr + rows * stride_t, mask=mask_n, other=ignore_index).to(tl.int64)
        m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first_col = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
        for j in range(0, tiles_per_split):
            cols = first_col + j * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = cols < V
            z = _logit_tile(h_ptr, w_ptr, rows, mask_n, cols, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                            BLOCK_N, BLOCK_V, BLOCK_D, COMPUTE_DTYPE, INPUT_PRECISION)
            if HAS_BIAS:
                z += tl.load(b_ptr + cols * stride_b, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            # a tile past the end of the vocabulary is all −inf: keep exp() away from (−inf) − (−inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
            z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        out = rows * num_splits + pid_s
        tl.store(max_ptr + out, m_i, mask=mask_n)
        tl.store(sum_ptr + out, s_i, mask=mask_n)
        tl.store(target_ptr + out, z_t, mask=mask_n)

    @triton.jit
    def _backward_kernel(
        h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
        N, D, V, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t,
        HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = rows < N
        mask_v = cols < V
        tgt = tl.load(t_ptr + rows * stride_t, mask=mask_n, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=mask_n, other=float("inf"))  # padding rows: p = 0, not exp(z)
        g = tl.load(g_ptr + rows, mask=mask_n, other=0.0)  # 0 for ignored rows
        z = _logit_tile(h_ptr, w_ptr, rows, mask_n, cols, mask_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        BLOCK_N, BLOCK_V, BLOCK_D, COMPUTE_DTYPE, INPUT_PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols * stride_b, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        p = tl.exp(z - lse[:, None])
        # softmax − one-hot, in fp32, before any rounding to the compute dtype
        p = tl.where(cols[None, :] == tgt[:, None], p - 1.0, p) * g[:, None]
        p = tl.where(mask_n[:, None] & mask_v[None, :], p, 0.0)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(p, axis=0), mask=mask_v)
        pc = p.to(COMPUTE_DTYPE)
        if NEED_DH or NEED_DW:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                if NEED_DH:
                    w = tl.load(w_ptr + cols[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                                mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(COMPUTE_DTYPE)
                    dh = tl.dot(pc, w, input_precision=INPUT_PRECISION)
                    tl.atomic_add(dh_ptr + rows[:, None] * D + offs_d[None, :], dh, mask=mask_n[:, None] & mask_d[None, :])
                if NEED_DW:
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(COMPUTE_DTYPE)
                    dw = tl.dot(tl.trans(pc), h, input_precision=INPUT_PRECISION)
                    tl.atomic_add(dw_ptr + cols[:, None] * D + offs_d[None, :], dw, mask=mask_v[:, None] & mask_d[None, :])


# -- launchers -------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _tl_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise TypeError(f"the Triton linear cross-entropy computes in float32, bfloat16 or float16, not {dtype}")
    return getattr(tl, _TL_DTYPES[dtype])


def _input_precision(compute_dtype: torch.dtype, device: torch.device) -> str:
    """fp32 operands: TF32 tensor cores where PyTorch allows TF32 matmuls, else exact fp32 ("ieee").
    bf16/fp16 operands: Triton's default ("tf32", which only concerns fp32 operands)."""
    if compute_dtype != torch.float32:
        return "tf32"
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> None:
    require_triton(hidden.device)
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"expected hidden (N, D), weight (V, D), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    devices = {hidden.device, weight.device, targets.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device, got {sorted(map(str, devices))}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")


def _check_target_range(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Out-of-range targets would silently score a logit of 0; refuse them like F.cross_entropy does.
    On CUDA the check is asynchronous (no host sync); on CPU it raises at once."""
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if targets.device.type == "cuda":
        torch._assert_async(~bad.any(), "linear_cross_entropy: a target is outside [0, num_classes) and not ignore_index")
    elif bool(bad.any()):
        raise IndexError(f"targets must be in [0, {num_classes}) or ignore_index ({ignore_index}); found {targets[bad][0].item()}")


def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX, compute_dtype: torch.dtype | None = None, config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``(N,)`` (0 where ignored) and log-sum-exp ``(N,)``, both fp32."""
    _check(hidden, weight, bias, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    cfg = config or default_config(device)
    compute_dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    _check_target_range(targets, V, ignore_index)
    n_blocks = triton.cdiv(N, cfg.block_n) if N else 0
    v_tiles = triton.cdiv(V, cfg.block_v)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(v_tiles, (cfg.programs_per_sm * sms + max(n_blocks, 1) - 1) // max(n_blocks, 1)))
    else:
        splits = min(v_tiles, 2)  # the interpreter: two splits, so the combination is exercised
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    part_max = torch.empty(N, splits, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_target = torch.empty_like(part_max)
    if N:
        launch(
            _forward_kernel, (n_blocks, splits),
            hidden, weight, bias if bias is not None else weight, targets, part_max, part_sum, part_target,
            N, D, V, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, targets.stride(0), tiles_per_split, splits, ignore_index,
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            COMPUTE_DTYPE=_tl_dtype(compute_dtype), INPUT_PRECISION=_input_precision(compute_dtype, device),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    m = part_max.amax(dim=1, keepdim=True)
    lse = (m + torch.log((part_sum * torch.exp(part_max - m)).sum(dim=1, keepdim=True))).squeeze(1)
    loss = torch.where(targets != ignore_index, lse - part_target.sum(dim=1), torch.zeros_like(lse))
    return loss, lse


def linear_cross_entropy_backward(
    grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    targets: torch.Tensor, lse: torch.Tensor, ignore_index: int = IGNORE_INDEX,
    compute_dtype: torch.dtype | None = None, config: KernelConfig | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_n grad_rows[n] · loss[n]`` for hidden, weight and bias (None where not needed),
    in each input's dtype."""
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    cfg = config or default_config(device)
    compute_dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    g = torch.where(targets != ignore_index, grad_rows.to(torch.float32), torch.zeros((), dtype=torch.float32, device=device))
    g = g.contiguous()
    dh = torch.zeros(N, D, dtype=torch.float32, device=device) if need_dh else None
    dw = torch.zeros(V, D, dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=device) if need_db else None
    if N and (need_dh or need_dw or need_db):
        grid = (triton.cdiv(N, cfg.backward_block_n), triton.cdiv(V, cfg.backward_block_v))
        dummy = g
        launch(
            _backward_kernel, grid,
            hidden, weight, bias if bias is not None else weight, targets, lse.contiguous(), g,
            dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
            N, D, V, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, targets.stride(0),
            HAS_BIAS=bias is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=cfg.backward_block_n, BLOCK_V=cfg.backward_block_v, BLOCK_D=cfg.block_d,
            COMPUTE_DTYPE=_tl_dtype(compute_dtype), INPUT_PRECISION=_input_precision(compute_dtype, device),
            num_warps=cfg.backward_num_warps, num_stages=cfg.num_stages,
        )
    return (dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row cross-entropy of ``h Wᵀ + b`` (fp32, 0 where ignored); gradients by the backward kernel."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, compute_dtype, config):
        loss, lse = linear_cross_entropy_forward(hidden, weight, bias, targets, ignore_index, compute_dtype, config)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index, ctx.compute_dtype, ctx.config = ignore_index, compute_dtype, config
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        dh, dw, db = linear_cross_entropy_backward(grad_loss, hidden, weight, bias, targets, lse, ctx.ignore_index,
                                                   ctx.compute_dtype, ctx.config, needs=needs)
        return dh, dw, db, None, None, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    try:
        enabled = torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype("cuda")
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype()


@torch.compiler.disable
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    reduction: str = "mean", ignore_index: int = IGNORE_INDEX, config: KernelConfig | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` without the ``N × V`` logits.

    ``hidden`` ``(..., D)``, ``targets`` of the same leading shape, ``weight`` ``(V, D)``, ``bias``
    ``(V,)`` or None. ``reduction`` in {"mean", "sum", "none"}; ``mean`` over all-ignored targets is
    0. The result is fp32 (``none``: one value per position, flattened). Under CUDA autocast the
    matmuls run in the autocast dtype (inputs are cast tile by tile inside the kernels, and the weight
    gradient comes back in the weight's own dtype, accumulated in fp32)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    compute = _autocast_dtype(h.device)
    if compute is None:
        compute = torch.promote_types(h.dtype, weight.dtype)
        if compute == torch.float64:
            raise TypeError("the Triton linear cross-entropy has no float64 path; use backend='torch' for float64")
    loss, _ = LinearCrossEntropyFunction.apply(h, weight, bias, t, ignore_index, compute, config)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum().clamp_min(1)


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The specification: materialise the logits and use PyTorch's cross-entropy (in the inputs'
    dtype, at least fp32; float64 in the tests). Same conventions as :func:`linear_cross_entropy`."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    t = targets.reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (t != ignore_index).sum().clamp_min(1)
