"""lmmem.kernels against float64 PyTorch references: the chunked fused linear cross-entropy (its
PyTorch step on CPU, its Triton step under the interpreter), the Hebbian statistics and update,
and every fallback path of the "never fail hard" runtime.

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
fp32 only, on small odd shapes: N = 37, D = 24, V = 131 — not multiples of any tile or chunk — so
every mask and chunk boundary is exercised. Inputs are fresh random numbers on every run (the seed
is in the failure message). The GPU-only tests at the end (bf16/fp16 Triton, the full WikiText-103
vocabulary, 64-bit offsets, peak memory) skip without CUDA.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from lmmem.errors import LmmemError  # noqa: E402
from lmmem.kernels import ce_step as ce_step_mod  # noqa: E402
from lmmem.kernels import hebbian as hebbian_mod  # noqa: E402
from lmmem.kernels.ce_step import ce_step_torch, ce_step_triton  # noqa: E402
from lmmem.kernels.hebbian import hebbian_mix_triton_, hebbian_statistics, merge_statistics, segment_classes  # noqa: E402
from lmmem.kernels.hebbian_rule import hebbian_update_reference  # noqa: E402
from lmmem.kernels.linear_cross_entropy import chunk_rows, linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from lmmem.kernels.runtime import KernelFallbackWarning, kernel_health, reset_kernel_health  # noqa: E402
from lmmem.output_layers import FullSoftmax, HebbianSoftmax  # noqa: E402

IGNORE = -100
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-only: bf16/fp16 and large shapes are wrong or too slow in Triton's CPU interpreter")
ALL_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.fixture(autouse=True)
def fresh_kernel_health():
    """Each test sees kernels as never probed (a forced failure must not leak into the next test)."""
    reset_kernel_health()
    yield
    reset_kernel_health()


def make_inputs(gen, N=37, D=24, V=131, bias=True, ignore_every=0, repeat=True, scale=0.5):
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) * scale
    b = torch.randn(V, generator=gen) * scale if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    if repeat:  # repeated labels: a few classes many times
        t[::3] = t[0]
        t[1::7] = V - 1  # the last class (in the vocabulary's partial last tile)
    if ignore_every:
        t[::ignore_every] = IGNORE
    return h, W, b, t


def grads_fused(h, W, b, t, reduction, upstream=None, device=DEVICE, **kw):
    leaves = [x.detach().to(device).requires_grad_() if x is not None else None for x in (h, W, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], leaves[2], t.to(device), reduction, **kw)
    (loss * upstream.to(device) if upstream is not None else loss).sum().backward()
    return loss.detach().cpu().double(), [x.grad.cpu().double() if x is not None else None for x in leaves]


def grads_reference(h, W, b, t, reduction, upstream=None, **kw):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (h, W, b)]
    loss = linear_cross_entropy_reference(leaves[0], leaves[1], leaves[2], t, reduction, **kw)
    (loss * upstream.double() if upstream is not None else loss).sum().backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def assert_matches(got, want, gen, what, rtol=2e-5, atol=2e-6):
    loss_g, grads_g = got
    loss_w, grads_w = want
    torch.testing.assert_close(loss_g, loss_w, rtol=rtol, atol=atol, msg=lambda m: f"{what} loss (seed {gen.initial_seed()}): {m}")
    for name, g, w in zip(("hidden", "weight", "bias"), grads_g, grads_w):
        if w is None:
            assert g is None
            continue
        # relative to the gradient's scale: entries of a softmax gradient span many magnitudes
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * max(1.0, w.abs().max().item()),
                                   msg=lambda m, name=name: f"{what} d{name} (seed {gen.initial_seed()}): {m}")


# -- the chunked path (PyTorch step) against float64 -----------------------------------------------


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["plain", "smoothing+zloss+softcap"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_matches_float64_reference(gen, reduction, bias, options):
    """Chunks of 16 rows over N = 37: the last chunk is partial and chunk boundaries split the rows;
    ignored and repeated targets; 'none' with a random upstream gradient (the recompute path)."""
    h, W, b, t = make_inputs(gen, bias=bias, ignore_every=5)
    b = b if bias else None
    upstream = torch.randn(h.shape[0], generator=gen) if reduction == "none" else None
    got = grads_fused(h, W, b, t, reduction, upstream, device="cpu", chunk_size=16, use_triton=False, **options)
    assert_matches(got, grads_reference(h, W, b, t, reduction, upstream, **options), gen, f"{reduction} {options}")


@pytest.mark.parametrize("option", [{"label_smoothing": 0.2}, {"z_loss": 0.05}, {"softcap": 2.0}], ids=lambda o: next(iter(o)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_each_option_alone_matches_float64_reference(gen, option, reduction):
    """Label smoothing (PyTorch's definition), z-loss (λ·lse², with its gradient) and the soft-cap
    c·tanh(z/c), one at a time, in float64 end to end: the formulas, not just fp32 noise."""
    h, W, b, t = make_inputs(gen, ignore_every=6, scale=1.5)  # large logits: the soft-cap bites
    upstream = torch.randn(h.shape[0], generator=gen) if reduction == "none" else None
    h64, W64, b64 = h.double(), W.double(), b.double()
    got = grads_fused(h64, W64, b64, t, reduction, upstream, device="cpu", chunk_size=10, **option)
    assert_matches(got, grads_reference(h, W, b, t, reduction, upstream, **option), gen, str(option), rtol=1e-10, atol=1e-12)
    plain = grads_reference(h, W, b, t, reduction, upstream)
    assert not torch.allclose(got[0], plain[0]), "the option changed nothing: the test would not see it ignored"


@pytest.mark.parametrize("shape,chunk", [((1, 16, 33), None), ((5, 16, 33), 64), ((50, 40, 96), 7),
                                         ((20, 7, 300), 3), ((37, 24, 131), 1)])
def test_odd_shapes_and_chunk_sizes(gen, shape, chunk):
    N, D, V = shape
    h, W, b, t = make_inputs(gen, N=N, D=D, V=V, bias=False, ignore_every=4 if N > 4 else 0)
    got = grads_fused(h, W, None, t, "mean", device="cpu", chunk_size=chunk, use_triton=False)
    assert_matches(got, grads_reference(h, W, None, t, "mean"), gen, f"shape {shape} chunk {chunk}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(gen, reduction):
    h, W, b, t = make_inputs(gen)
    t[:] = IGNORE
    loss, grads = grads_fused(h, W, b, t, reduction, device="cpu", chunk_size=16, **ALL_OPTIONS)
    assert not torch.isnan(loss).any() and torch.count_nonzero(loss) == 0
    for g in grads:
        assert torch.count_nonzero(g) == 0


def test_float64_inputs_are_computed_in_float64(gen):
    h, W, b, t = make_inputs(gen, ignore_every=5)
    got = grads_fused(h.double(), W.double(), b.double(), t, "sum", device="cpu", chunk_size=8)
    assert_matches(got, grads_reference(h, W, b, t, "sum"), gen, "float64", rtol=1e-12, atol=1e-12)


def test_bf16_autocast_over_fp32_weights_on_cpu(gen):
    """The training default (bf16 autocast, fp32 master weights), on CPU autocast: matmuls in bf16,
    softmax in fp32, gradients in fp32 (the weights' dtype). Our error against float64 must be
    within twice that of eager PyTorch under the same autocast (F.linear + F.cross_entropy)."""
    h, W, b, t = make_inputs(gen, N=64, D=48, V=301, ignore_every=7)
    want = grads_reference(h, W, b, t, "mean")

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (h, W, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(*leaves)
        loss.backward()
        assert all(x.grad.dtype == torch.float32 for x in leaves)
        return loss.double(), [x.grad.double() for x in leaves]

    ours = run(lambda h_, W_, b_: linear_cross_entropy(h_, W_, b_, t, chunk_size=16))
    eager = run(lambda h_, W_, b_: torch.nn.functional.cross_entropy(torch.nn.functional.linear(h_, W_, b_).float(), t,
                                                                   ignore_index=IGNORE))
    for name, o, e, w in zip(("loss", "dh", "dW", "db"), [ours[0], *ours[1]], [eager[0], *eager[1]], [want[0], *want[1]]):
        err_o, err_e = (o - w).abs().max().item(), (e - w).abs().max().item()
        # db sums the logit gradients after they are stored in the compute dtype (bf16), eager sums them
        # in fp32: its error is 2.0–2.9× eager's (300 seeds; a 2× bound failed 6% of runs). Exactly that
        # rounding, and nothing else, is checked below.
        factor = 4 if name == "db" else 2
        assert err_o <= factor * err_e + 1e-6, f"{name}: ours {err_o:.3g} vs eager autocast {err_e:.3g} (seed {gen.initial_seed()})"
    assert (ours[0] - want[0]).abs().item() > 0  # bf16 really was used (an fp32 run would be ~1e-7 off)
    z = torch.nn.functional.linear(h.bfloat16(), W.bfloat16(), b.bfloat16()).float()
    valid = t != IGNORE
    g = torch.softmax(z, 1)
    g[valid, t[valid]] -= 1
    g[~valid] = 0
    db_bf16_logit_grads = (g / valid.sum()).bfloat16().float().sum(0)
    torch.testing.assert_close(ours[1][2].float(), db_bf16_logit_grads, rtol=0, atol=1e-5,  # one bf16 ulp of a gradient flip: ~2e-6
                               msg=lambda m: f"db (seed {gen.initial_seed()}): {m}")


def test_confident_predictions_keep_the_target_gradient(gen):
    """+10 on each row's target logit (h moved along its target's row): p_target ≈ 1, so the target's
    gradient p − 1 is tiny — lost entirely if the −1 were applied after rounding p. It must match
    the float64 reference as well as PyTorch's own fp32 does, on both steps."""
    h, W, b, t = make_inputs(gen, D=64, repeat=False)
    t = torch.randperm(W.shape[0], generator=gen)[: h.shape[0]]  # distinct targets: db[t] is one row's p − 1
    h = h * 0.1 + 10.0 * W[t] / (W[t] ** 2).sum(1, keepdim=True)
    want = grads_reference(h, W, b, t, "sum")
    target_grad = want[1][2][t]
    fp32 = [x.detach().float().requires_grad_() for x in (h, W, b)]
    linear_cross_entropy_reference(*fp32, t, "sum").backward()
    torch_err = (fp32[2].grad.double()[t] - target_grad).abs().max().item()
    for use_triton in (False, True):
        got = grads_fused(h, W, b, t, "sum", device="cpu", use_triton=use_triton, chunk_size=16)
        assert target_grad.abs().median() < 0.05 and got[0].item() < 0.1 * h.shape[0]  # the situation under test
        ours = (got[1][2][t] - target_grad).abs().max().item()
        assert ours <= 4 * torch_err + 1e-7, f"triton={use_triton}: target gradient error {ours:.3g} vs PyTorch fp32 {torch_err:.3g} (seed {gen.initial_seed()})"
        assert_matches(got, want, gen, "confident", rtol=1e-4)


@pytest.mark.parametrize("use_triton", [False, True])
def test_large_common_logit_offset(gen, use_triton):
    """A common offset of 1e4 on every logit overflows a naive exp; the log-sum-exp must not care."""
    h, W, b, t = make_inputs(gen, ignore_every=6)
    got = grads_fused(h, W, b + 1e4, t, "mean", device="cpu", use_triton=use_triton)
    want = grads_reference(h, W, b, t, "mean")  # softmax is shift-invariant
    assert torch.isfinite(got[0]).all()
    # fp32 logits near 1e4 carry ~1e−3 absolute rounding: compare at that resolution
    assert_matches(got, want, gen, "offset", rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("use_triton", [False, True])
def test_non_contiguous_inputs_and_int32_targets(gen, use_triton):
    h, W, b, t = make_inputs(gen, N=37, D=24, V=131, ignore_every=5)
    h_nc = torch.randn(24, 37, generator=gen).t()  # stride (1, 37)
    h_nc.copy_(h)
    W_nc = torch.empty(131, 48)[:, ::2]  # stride (48, 2)
    W_nc.copy_(W)
    assert not h_nc.is_contiguous() and not W_nc.is_contiguous()
    got = grads_fused(h_nc, W_nc, b, t.to(torch.int32), "mean", device="cpu", use_triton=use_triton, chunk_size=16)
    assert_matches(got, grads_reference(h, W, b, t, "mean"), gen, "non-contiguous")


def test_three_dimensional_hidden_and_gradient_flows_through_autograd(gen):
    h, W, b, t = make_inputs(gen, N=36)
    h3 = h.reshape(4, 9, 24)
    leaves = [x.clone().requires_grad_() for x in (h3, W, b)]
    loss = linear_cross_entropy(leaves[0] * 2.0, leaves[1], leaves[2], t.reshape(4, 9), chunk_size=10)  # an op before it
    loss.backward()
    ref = [x.double().clone().requires_grad_() for x in (h3, W, b)]
    linear_cross_entropy_reference(ref[0] * 2.0, ref[1], ref[2], t.reshape(4, 9)).backward()
    for g, r in zip(leaves, ref):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=2e-5, atol=2e-6)


def test_only_the_gradients_asked_for_are_computed(gen):
    h, W, b, t = make_inputs(gen)
    hl = h.clone().requires_grad_()
    linear_cross_entropy(hl, W, b, t).backward()  # W, b frozen
    want = grads_reference(h, W, b, t, "mean")[1][0]
    torch.testing.assert_close(hl.grad.double(), want, rtol=2e-5, atol=2e-6)
    with torch.no_grad():
        loss = linear_cross_entropy(hl, W, b, t, "none")
    want_none = linear_cross_entropy_reference(h.double(), W.double(), b.double(), t, "none")
    torch.testing.assert_close(loss.double(), want_none, rtol=2e-5, atol=2e-6)


def test_a_second_backward_is_refused_not_double_scaled(gen):
    """The forward's gradients are scaled in place by backward (no second V × D buffer), so a second
    backward through the same graph must fail loudly rather than return wrong numbers."""
    h, W, b, t = make_inputs(gen)
    Wl = W.clone().requires_grad_()
    loss = linear_cross_entropy(h, Wl, b, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_torch_compile_keeps_one_graph(gen):
    """Registered with torch.library: fullgraph=True fails on any graph break; aot_eager traces the
    backward formula too (the in-place scaling is functionalised there)."""
    h, W, b, t = make_inputs(gen, ignore_every=5)

    def f(h_, W_, b_):
        return linear_cross_entropy(torch.tanh(h_), W_, b_, t, label_smoothing=0.1) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_() for x in (h, W, b)]
        fn(*leaves).backward()
        out.append([x.grad for x in leaves])
    for a, c in zip(*out):
        torch.testing.assert_close(a, c)


def test_chunk_size_rule():
    """On CPU: 16 MiB of logits per chunk but at least 128 rows while that stays under 30 MiB (a block
    the allocator reuses), else ~200 MiB (fp32; plus the fp32 working copy for bf16); never above N;
    a shape- and device-determined size (the same bits every run)."""
    cpu, f32 = torch.device("cpu"), torch.float32
    V = 267_735
    rows = chunk_rows(2048, V, 512, cpu, f32, use_triton=False)
    assert rows == 192 and rows * V * 4 <= 200 << 20
    assert chunk_rows(2048, V, 512, cpu, torch.bfloat16, use_triton=False) < rows
    assert chunk_rows(37, 131, 24, cpu, f32, use_triton=False) == 37
    assert chunk_rows(4096, 30_000, 128, cpu, f32, use_triton=False) == 128  # 15 MiB (16 MiB holds 139 rows)
    assert chunk_rows(4096, 10_000, 128, cpu, f32, use_triton=False) == 416  # 16 MiB
    assert chunk_rows(4096, 50_257, 512, cpu, f32, use_triton=False) == 128  # 25 MiB: the 128-row floor
    assert chunk_rows(4096, 61_441, 512, cpu, f32, use_triton=False) == 848  # 128 rows would be 30 MiB: 200 MiB


# -- the Triton step under the interpreter against the PyTorch step --------------------------------


@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("with_grad", [False, True])
def test_triton_step_matches_torch_step(gen, with_grad, softcap):
    z = torch.randn(9, 77, generator=gen) * 3
    t = torch.randint(0, 77, (9,), generator=gen, dtype=torch.int32)
    t[2], t[5] = IGNORE, 76
    w = torch.randn(9, generator=gen) if with_grad else None
    opts = (IGNORE, 0.1, 0.02, softcap)
    z_t, z_r = z.clone(), z.double()
    loss_t, lse_t = ce_step_triton(z_t, t, w, *opts)
    loss_r, lse_r = ce_step_torch(z_r, t, w.double() if w is not None else None, *opts)
    torch.testing.assert_close(loss_t.double(), loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_t.double(), lse_r, rtol=1e-5, atol=1e-5)
    if with_grad:
        torch.testing.assert_close(z_t.double(), z_r, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(z_t[2]) == 0  # the ignored row


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_with_triton_step_matches_float64_reference(gen, reduction):
    h, W, b, t = make_inputs(gen, ignore_every=5)
    upstream = torch.rand(h.shape[0], generator=gen) if reduction == "none" else None
    got = grads_fused(h, W, b, t, reduction, upstream, use_triton=True, chunk_size=16, **ALL_OPTIONS)
    assert_matches(got, grads_reference(h, W, b, t, reduction, upstream, **ALL_OPTIONS), gen, reduction)
    assert kernel_health() and all(kernel_health().values()), kernel_health()  # the kernel really ran


# -- never failing hard: every fallback path, forced on CPU ----------------------------------------


class _FailingKernel:
    """Stands in for a JIT kernel whose launch fails on an untested GPU (or fails only at full size)."""

    def __init__(self, real=None, fail_above_rows: int = -1, exc: Exception | None = None, corrupt: bool = False):
        self.real, self.fail_above_rows, self.corrupt = real, fail_above_rows, corrupt
        self.exc = exc or RuntimeError("PTXASError: ptxas fatal: unsupported .version 9.9")
        self.launches = 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            if grid[0] > self.fail_above_rows and not self.corrupt:
                raise self.exc
            self.real[grid](*args, **kwargs)
            if self.corrupt:
                args[4].add_(1.0)  # a kernel that runs but computes a wrong loss
        return run


def _patch_kernels(monkeypatch, module, **kernels):
    from lmmem.kernels import triton_kernels

    fake = types.SimpleNamespace(**{**vars(triton_kernels), **kernels})
    monkeypatch.setattr(module, "runtime_kernels", lambda: fake)


@pytest.mark.parametrize("how", ["compile-fails", "fails-at-full-size", "wrong-result"])
def test_a_failing_step_kernel_warns_once_and_falls_back(gen, monkeypatch, how):
    from lmmem.kernels import triton_kernels

    kernel = {"compile-fails": _FailingKernel(),
              "fails-at-full-size": _FailingKernel(triton_kernels.ce_step_kernel, fail_above_rows=5),
              "wrong-result": _FailingKernel(triton_kernels.ce_step_kernel, corrupt=True)}[how]
    _patch_kernels(monkeypatch, ce_step_mod, ce_step_kernel=kernel)
    h, W, b, t = make_inputs(gen, ignore_every=5)
    with pytest.warns(KernelFallbackWarning, match=r"ce_step.*float32.*(PTXASError|AssertionError|Mismatch)"):
        got = grads_fused(h, W, b, t, "mean", use_triton=True, chunk_size=16)
    assert_matches(got, grads_reference(h, W, b, t, "mean"), gen, how)
    assert list(kernel_health().values()) == [False]
    launches = kernel.launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again, and the kernel is not tried again
        grads_fused(h, W, b, t, "none", torch.ones(h.shape[0]), use_triton=True, chunk_size=16)
    assert kernel.launches == launches


def test_failing_hebbian_kernels_fall_back_to_pytorch(gen, monkeypatch):
    _patch_kernels(monkeypatch, hebbian_mod, segment_sum_kernel=_FailingKernel(), mix_kernel=_FailingKernel())
    h, W, b, t = make_inputs(gen, ignore_every=5)
    V = W.shape[0]
    counts = torch.randint(0, 4, (V,), generator=gen)
    W_k, c_k = W.clone(), counts.clone()
    with pytest.warns(KernelFallbackWarning) as record:
        hebbian_mix_triton_(W_k, c_k, *hebbian_statistics(h, t, V, IGNORE), gamma=0.01, smoothing_limit=500)
    assert {str(w.message).split("variant ")[1].split(",")[0] for w in record} == {"('segment_sum'", "('hebbian_mix'"}
    W_r, c_r = hebbian_update_reference(W, counts, h, t, gamma=0.01, smoothing_limit=500)
    assert torch.equal(c_k, c_r)
    torch.testing.assert_close(W_k.double(), W_r, rtol=1e-5, atol=1e-6)


def test_lmmem_triton_0_switches_triton_off(gen, monkeypatch):
    monkeypatch.setenv("LMMEM_TRITON", "0")
    h, W, b, t = make_inputs(gen)
    layer = FullSoftmax(24, 131, backend="auto")
    assert not layer.uses_triton(h)
    with pytest.raises(LmmemError, match="LMMEM_TRITON=0"):
        linear_cross_entropy(h, W, b, t, use_triton=True)
    assert_matches(grads_fused(h, W, b, t, "mean"), grads_reference(h, W, b, t, "mean"), gen, "LMMEM_TRITON=0")
    assert kernel_health() == {}  # nothing was probed


def test_error_messages_name_remedies_that_exist(gen):
    """Every keyword a refusal tells the user to pass is a real parameter of the function."""
    h, W, b, t = make_inputs(gen)
    params = set(inspect.signature(linear_cross_entropy).parameters)
    cases = [
        (lambda: linear_cross_entropy(h.int(), W, b, t), TypeError),
        (lambda: linear_cross_entropy(h, W, b, t.float()), TypeError),
        (lambda: linear_cross_entropy(h, W.double(), b, t, use_triton=True), LmmemError),
        (lambda: linear_cross_entropy(h[:, :5], W, b, t), ValueError),
    ]
    for call, exc in cases:
        with pytest.raises(exc) as info:
            call()
        for name in re.findall(r"(\w+)=None", str(info.value)):
            assert name in params, f"{info.value!r} names {name}=, which linear_cross_entropy does not have"
    t[2] = W.shape[0]  # out of range and not ignore_index
    with pytest.raises(IndexError, match="ignore_index"):
        linear_cross_entropy(h, W, b, t)


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_names_the_fix():
    code = ("import torch; from lmmem.output_layers import FullSoftmax\n"
            "l = FullSoftmax(8, 20, backend='triton')\n"
            "l.loss(torch.randn(3, 8), torch.tensor([1, 2, 3]))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "backend='auto'" in proc.stderr


# -- Hebbian statistics and update -----------------------------------------------------------------


def test_segment_classes_matches_unique(gen):
    t = torch.randint(0, 13, (41,), generator=gen)
    t[::4] = IGNORE
    ids, slot = segment_classes(t, 13, IGNORE)
    want = torch.unique(t[t != IGNORE])
    assert torch.equal(ids[: want.numel()], want)
    assert (ids[want.numel():] == 13).all()
    mapped = torch.where(t == IGNORE, torch.full_like(t, 13), t)
    assert torch.equal(ids[slot], mapped)


def test_statistics_match_per_class_sums(gen):
    h, W, b, t = make_inputs(gen, ignore_every=4)
    ids, n, sums = hebbian_statistics(h, t, W.shape[0], IGNORE)
    h64 = h.double()
    for u in range(ids.numel()):
        c = int(ids[u])
        if c == W.shape[0]:
            continue
        where = t == c
        assert int(n[u]) == int(where.sum())
        torch.testing.assert_close(sums[u].double(), h64[where].sum(0), rtol=1e-6, atol=1e-5)
    real = ids < W.shape[0]
    assert int(n[real].sum()) == int((t != IGNORE).sum())
    assert torch.unique(ids[real]).numel() == int(real.sum())  # distinct classes


@pytest.mark.parametrize("rescale", [False, True])
def test_mix_kernel_matches_reference_rule(gen, rescale):
    h, W, b, t = make_inputs(gen, ignore_every=5)
    V = W.shape[0]
    counts = torch.randint(0, 4, (V,), generator=gen)
    # three distinct classes present in the batch (random labels repeat, and some positions are ignored)
    present = t[t != IGNORE].unique()
    present = present[torch.randperm(len(present), generator=gen)]
    saturated, first, last = present[:3].tolist()
    counts[saturated] = 700  # past T: the rule leaves it alone
    counts[first] = 0  # first sighting: λ = 1
    counts[last] = 499  # the last count below T
    W_k, c_k = W.clone(), counts.clone()
    hebbian_mix_triton_(W_k, c_k, *hebbian_statistics(h, t, V, IGNORE), gamma=0.01, smoothing_limit=500, rescale=rescale)
    W_r, c_r = hebbian_update_reference(W, counts, h, t, gamma=0.01, smoothing_limit=500, rescale=rescale)
    assert torch.equal(c_k, c_r)
    torch.testing.assert_close(W_k.double(), W_r, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
    assert torch.equal(W_k[saturated], W[saturated])  # c ≥ T: untouched, bit for bit
    assert not torch.equal(W_k[first], W[first])  # a first sighting is written


def test_merged_micro_batch_statistics_equal_one_batch(gen):
    h, W, b, t = make_inputs(gen, N=45, ignore_every=7)
    V = W.shape[0]
    parts = [hebbian_statistics(h[i:j], t[i:j], V, IGNORE) for i, j in ((0, 11), (11, 30), (30, 45))]
    merged = merge_statistics(merge_statistics(parts[0], parts[1], V), parts[2], V)
    counts = torch.zeros(V, dtype=torch.int64)
    W_k, c_k = W.clone(), counts.clone()
    hebbian_mix_triton_(W_k, c_k, *merged, gamma=0.01, smoothing_limit=500)
    W_r, c_r = hebbian_update_reference(W, counts, h, t)
    assert torch.equal(c_k, c_r)
    torch.testing.assert_close(W_k.double(), W_r, rtol=1e-5, atol=1e-6)


# -- the layers' dispatch --------------------------------------------------------------------------


def _train(layer_cls, backend, h_seq, t_seq, seed, accumulate=1, **kw):
    torch.manual_seed(seed)
    layer = layer_cls(24, 131, backend=backend, **kw).to(DEVICE)
    # SGD (with momentum), not Adam: Adam's m/√v turns fp32 noise in a near-zero gradient into a full step
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    layer.attach_to_optimizer(opt)
    losses = []
    for i, (h, t) in enumerate(zip(h_seq, t_seq)):
        loss = layer.loss(h.to(DEVICE), t.to(DEVICE)) / accumulate
        loss.backward()
        losses.append(loss.item())
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return layer, losses


@pytest.mark.parametrize("layer_cls,accumulate,backend", [(FullSoftmax, 1, "auto"), (FullSoftmax, 1, "triton"),
                                                           (HebbianSoftmax, 1, "triton"), (HebbianSoftmax, 2, "triton"),
                                                           (HebbianSoftmax, 2, "auto")])
def test_layer_trains_identically_with_either_backend(gen, layer_cls, accumulate, backend):
    """Three optimizer steps: the fused backends ("triton": Triton step, statistics and mixing
    kernels; "auto" on CPU: the chunked PyTorch path) and the materialising "torch" backend reach
    the same weights, counts and losses."""
    steps = 3 * accumulate
    h_seq = [torch.randn(37, 24, generator=gen) for _ in range(steps)]
    t_seq = [make_inputs(gen, ignore_every=6)[3] for _ in range(steps)]
    a, la = _train(layer_cls, backend, h_seq, t_seq, gen.initial_seed(), accumulate)
    b, lb = _train(layer_cls, "torch", h_seq, t_seq, gen.initial_seed(), accumulate)
    assert a.uses_triton(a.weight) == (backend == "triton" or CUDA) and not b.uses_triton(b.weight)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
    if layer_cls is HebbianSoftmax:
        assert torch.equal(a.counts, b.counts) and int(a.counts.sum()) > 0


def test_auto_backend_is_torch_on_cpu_and_backend_is_validated():
    layer = HebbianSoftmax(8, 10)
    assert layer.backend == "auto" and not layer.uses_triton(torch.randn(2, 8))
    with pytest.raises(ValueError, match="backend"):
        FullSoftmax(8, 10, backend="cuda")
    layer.backend = "torch"
    assert "backend" not in str(layer.state_dict().keys())


# -- GPU-only --------------------------------------------------------------------------------------


def _same_dtype_error(dtype, h, W, b, t):
    """|PyTorch in ``dtype`` − float64| for loss and gradients: the yardstick for our error."""
    want = grads_reference(h, W, b, t, "mean")
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (h, W, b)]
    linear_cross_entropy_reference(*leaves, t.to(DEVICE), "mean").backward()
    return want, [(x.grad.double().cpu() - w).abs().max().item() for x, w in zip(leaves, want[1])]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_within_pytorchs_own(gen, dtype):
    h, W, b, t = make_inputs(gen, N=1000, D=256, V=5003, ignore_every=9)
    want, torch_err = _same_dtype_error(dtype, h, W, b, t)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (h, W, b)]
    linear_cross_entropy(*leaves, t.to(DEVICE), "mean").backward()
    for x, w, e in zip(leaves, want[1], torch_err):
        ours = (x.grad.double().cpu() - w).abs().max().item()
        assert ours <= 2.0 * e + 1e-6, f"{dtype}: our error {ours:.3g} vs PyTorch's {e:.3g} (seed {gen.initial_seed()})"


@needs_cuda
def test_full_wikitext103_vocabulary(gen):
    h, W, b, t = make_inputs(gen, N=512, D=512, V=267_735, ignore_every=11, scale=0.05)
    assert_matches(grads_fused(h, W, b, t, "mean"), grads_reference(h, W, b, t, "mean"), gen, "V=267,735", rtol=1e-3, atol=1e-4)
    assert kernel_health() and all(kernel_health().values()), kernel_health()  # Triton ran, nothing fell back


@needs_cuda
def test_bf16_autocast_over_fp32_weights_on_cuda_is_deterministic(gen):
    """The training default on the GPU: within twice eager autocast's error, and bit-identical on a
    second run (no atomics; fixed chunking), also under torch.use_deterministic_algorithms."""
    h, W, b, t = make_inputs(gen, N=3000, D=256, V=20_011, ignore_every=9, scale=0.05)
    want = grads_reference(h, W, b, t, "mean")

    def run(fn):
        leaves = [x.to(DEVICE).requires_grad_() for x in (h, W, b)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(*leaves)
        loss.backward()
        return [loss.double().cpu()] + [x.grad.double().cpu() for x in leaves]

    fused = lambda h_, W_, b_: linear_cross_entropy(h_, W_, b_, t.to(DEVICE))  # noqa: E731
    ours = run(fused)
    eager = run(lambda h_, W_, b_: torch.nn.functional.cross_entropy(torch.nn.functional.linear(h_, W_, b_).float(), t.to(DEVICE)))
    for name, o, e, w in zip(("loss", "dh", "dW", "db"), ours, eager, [want[0], *want[1]]):
        err_o, err_e = (o - w).abs().max().item(), (e - w).abs().max().item()
        assert err_o <= 2 * err_e + 1e-6, f"{name}: ours {err_o:.3g} vs eager autocast {err_e:.3g}"
    torch.use_deterministic_algorithms(True)
    try:
        again = run(fused)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, c) for a, c in zip(ours, again))
    assert all(kernel_health().values()), kernel_health()


@needs_cuda
def test_int64_offsets_beyond_two_to_the_31():
    """V·D = 267,735 × 8,200 > 2³¹: offsets must be 64-bit. Checked on the last rows of W."""
    V, D, N = 267_735, 8_200, 64
    assert V * D > 2**31
    torch.manual_seed(0)
    W = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.01)
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(V - 1000, V, (N,), device="cuda")  # targets in the last rows
    W_leaf = W.requires_grad_()
    loss = linear_cross_entropy(h, W_leaf, None, t, "sum")
    loss.backward()
    ref = torch.nn.functional.cross_entropy((h.float() @ W.float().t()), t, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-2)
    rows = torch.unique(t)
    hf = h.float()
    lse = torch.logsumexp(hf @ W.float().t(), 1, keepdim=True)
    P = torch.exp(hf @ W.float()[rows].t() - lse) - (t[:, None] == rows[None, :]).float()
    torch.testing.assert_close(W_leaf.grad[rows].float(), P.t() @ hf, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_benchmark_script_runs_in_smoke_mode(tmp_path):
    """The GPU benchmark is one command away; --smoke runs its code path on CPU (interpreter, tiny shapes)."""
    from conftest import run_script

    out = tmp_path / "bench.json"
    run_script("benchmarks/bench_linear_cross_entropy.py", "--smoke", "--out", str(out), check=True, timeout=300)
    import json

    rows = json.loads(out.read_text())["results"]
    expected = {"lmmem", "eager"} | ({"F.linear_cross_entropy"} if hasattr(torch.nn.functional, "linear_cross_entropy") else set())
    assert {r["method"] for r in rows} == expected and all(r.get("ms", 0) > 0 for r in rows), rows


def test_cpu_chunk_benchmark_runs_in_smoke_mode(tmp_path):
    """benchmarks/bench_cpu_chunk.py (the CPU chunk rule against the previous one, in one process)."""
    import json

    from conftest import run_script

    out = tmp_path / "bench.json"
    run_script("benchmarks/bench_cpu_chunk.py", "--smoke", "--out", str(out), check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["rule ms"] > 0 and r["200MiB ms"] > 0 for r in rows), rows


@pytest.mark.slow
def test_train_py_with_the_triton_backend_matches_the_torch_backend(small_corpus, tmp_path, one_thread):
    """The trainer end to end (on_optimizer_step, checkpoints) with --softmax-backend triton: the same
    weights and Hebbian counts as --softmax-backend torch after a few steps."""
    from lmmem.training import config_from_args, load_checkpoint, train

    ckpts = {}
    for backend in ("triton", "torch"):
        cfg = config_from_args({"data": str(small_corpus), "out": str(tmp_path / backend), "preset": "tiny",
                                "embed_dim": 24, "hidden_dim": 32, "proj_dim": 24, "batch_size": 3, "bptt": 9,
                                "max_steps": 4, "eval_interval": 0, "eval_tokens": 60, "progress": False,
                                "softmax": "hebbian", "softmax_backend": backend, "dropout": 0.0, "output_dropout": 0.0,
                                "optimizer": "sgd", "lr": 0.5})
        train(cfg)
        ckpts[backend] = load_checkpoint(tmp_path / backend / "last.pt")
    a, b = ckpts["triton"]["model"], ckpts["torch"]["model"]
    assert torch.equal(a["output.counts"], b["output.counts"]) and int(a["output.counts"].sum()) == 4 * 3 * 9
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@needs_cuda
def test_peak_memory_has_no_n_by_v_buffer():
    """N = 8,192, V = 267,735, bf16: the logits alone would be 4.4 GB; forward + backward must stay
    far below that (the fp32 weight-gradient accumulator, V × D × 4 = 0.55 GB, is the largest buffer)."""
    N, D, V = 8192, 512, 267_735
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, W, None, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.5 * N * V * 2, f"peak {extra / 2**30:.2f} GiB above the inputs"
