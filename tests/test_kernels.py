"""Triton kernels (lmmem.kernels) against float64 PyTorch references.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), fp32 only, on
small odd shapes: N = 37, D = 24, V = 131 — not multiples of any tile — so every mask is exercised.
Inputs are fresh random numbers on every run (the seed is in the failure message). The GPU-only
tests at the end (bf16/fp16, the full WikiText-103 vocabulary, 64-bit offsets) skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from lmmem.kernels.hebbian import hebbian_mix_triton_, hebbian_statistics, merge_statistics, segment_classes  # noqa: E402
from lmmem.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from lmmem.output_layers import FullSoftmax, HebbianSoftmax  # noqa: E402
from lmmem.output_layers.hebbian_softmax import hebbian_update_reference  # noqa: E402

IGNORE = -100
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-only: bf16/fp16 and large shapes are wrong or too slow in Triton's CPU interpreter")


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g


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


def grads_triton(h, W, b, t, reduction, upstream=None, **kw):
    leaves = [x.detach().to(DEVICE).requires_grad_() if x is not None else None for x in (h, W, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], leaves[2], t.to(DEVICE), reduction, **kw)
    (loss * upstream.to(DEVICE) if upstream is not None else loss).sum().backward()
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


# -- fused linear cross-entropy --------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients_match_float64_reference(gen, reduction):
    h, W, b, t = make_inputs(gen, ignore_every=5)
    upstream = torch.rand(h.shape[0], generator=gen) if reduction == "none" else None
    assert_matches(grads_triton(h, W, b, t, reduction, upstream), grads_reference(h, W, b, t, reduction, upstream), gen, reduction)


@pytest.mark.parametrize("shape", [(1, 16, 33), (37, 24, 131), (50, 40, 96), (20, 7, 300)])
def test_odd_shapes_and_no_bias(gen, shape):
    N, D, V = shape
    h, W, b, t = make_inputs(gen, N=N, D=D, V=V, bias=False, ignore_every=4 if N > 4 else 0)
    assert_matches(grads_triton(h, W, None, t, "mean"), grads_reference(h, W, None, t, "mean"), gen, f"shape {shape}")


def test_all_ignored_gives_zero_loss_and_zero_gradients(gen):
    h, W, b, t = make_inputs(gen)
    t[:] = IGNORE
    loss, grads = grads_triton(h, W, b, t, "mean")
    assert loss.item() == 0.0 and not torch.isnan(loss)
    for g in grads:
        assert torch.count_nonzero(g) == 0


def test_confident_predictions_keep_the_target_gradient(gen):
    """+10 on each row's target logit (h moved along its target's row): p_target ≈ 1, so the target's
    gradient p − 1 is tiny — lost entirely if the −1 were applied after rounding p to bf16. It must
    match the float64 reference."""
    # D = 64: moving h along its target's row shifts the other logits by only ~±1.3 (±2 at D = 24)
    h, W, b, t = make_inputs(gen, D=64, repeat=False)
    t = torch.randperm(W.shape[0], generator=gen)[: h.shape[0]]  # distinct targets: db[t] is one row's p − 1
    h = h * 0.1 + 10.0 * W[t] / (W[t] ** 2).sum(1, keepdim=True)
    got, want = grads_triton(h, W, b, t, "sum"), grads_reference(h, W, b, t, "sum")
    target_grad = want[1][2][t]
    assert target_grad.abs().median() < 0.05 and got[0].item() < 0.1 * h.shape[0]  # the situation under test
    # fp32 cannot do better than z − lse to ~1e−6 here; PyTorch's own fp32 error is the yardstick
    fp32 = [x.detach().float().requires_grad_() for x in (h, W, b)]
    linear_cross_entropy_reference(*fp32, t, "sum").backward()
    torch_err = (fp32[2].grad.double()[t] - target_grad).abs().max().item()
    ours = (got[1][2][t] - target_grad).abs().max().item()
    assert ours <= 4 * torch_err + 1e-7, f"target gradient error {ours:.3g} vs PyTorch fp32 {torch_err:.3g} (seed {gen.initial_seed()})"
    assert_matches(got, want, gen, "confident", rtol=1e-4)


def test_large_common_logit_offset(gen):
    """A common offset of 1e4 on every logit overflows a naive exp; the online LSE must not care."""
    h, W, b, t = make_inputs(gen, ignore_every=6)
    b = b + 1e4
    got = grads_triton(h, W, b, t, "mean")
    want = grads_reference(h, W, b - 1e4, t, "mean")  # softmax is shift-invariant
    assert torch.isfinite(got[0]).all()
    # fp32 logits near 1e4 carry ~1e−3 absolute rounding: compare at that resolution
    assert_matches(got, want, gen, "offset", rtol=5e-3, atol=5e-3)


def test_non_contiguous_inputs_and_int32_targets(gen):
    h, W, b, t = make_inputs(gen, N=37, D=24, V=131, ignore_every=5)
    h_nc = torch.randn(24, 37, generator=gen).t()  # stride (1, 37)
    h_nc.copy_(h)
    W_nc = torch.empty(131, 48)[:, ::2]  # stride (48, 2)
    W_nc.copy_(W)
    assert not h_nc.is_contiguous() and not W_nc.is_contiguous()
    got = grads_triton(h_nc, W_nc, b, t.to(torch.int32), "mean")
    assert_matches(got, grads_reference(h, W, b, t, "mean"), gen, "non-contiguous")


def test_three_dimensional_hidden_and_gradient_flows_through_autograd(gen):
    h, W, b, t = make_inputs(gen, N=36)
    h3 = h.reshape(4, 9, 24)
    leaves = [x.clone().requires_grad_() for x in (h3, W, b)]
    loss = linear_cross_entropy(leaves[0] * 2.0, leaves[1], leaves[2], t.reshape(4, 9))  # an op before the kernel
    loss.backward()
    ref = [x.double().clone().requires_grad_() for x in (h3, W, b)]
    linear_cross_entropy_reference(ref[0] * 2.0, ref[1], ref[2], t.reshape(4, 9)).backward()
    for g, r in zip(leaves, ref):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=2e-5, atol=2e-6)


def test_bad_targets_and_shapes_are_refused(gen):
    h, W, b, t = make_inputs(gen)
    t[2] = W.shape[0]  # out of range and not ignore_index
    with pytest.raises(IndexError, match="ignore_index"):
        linear_cross_entropy(h, W, b, t)
    with pytest.raises(ValueError, match="shape mismatch|positions"):
        linear_cross_entropy(h[:, :5], W, b, t)
    with pytest.raises(TypeError, match="float64"):
        linear_cross_entropy(h.double(), W.double(), b.double(), t.clamp_max(5))


def test_triton_on_cpu_without_interpreter_names_the_fix():
    code = ("import torch; from lmmem.output_layers import FullSoftmax\n"
            "l = FullSoftmax(8, 20, backend='triton')\n"
            "l.loss(torch.randn(3, 8), torch.tensor([1, 2, 3]))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "backend='torch'" in proc.stderr


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
    counts[t[0]] = 700  # past T: the rule leaves it alone
    counts[t[2]] = 0  # first sighting: λ = 1
    counts[t[4]] = 499  # the last count below T
    W_k, c_k = W.clone(), counts.clone()
    hebbian_mix_triton_(W_k, c_k, *hebbian_statistics(h, t, V, IGNORE), gamma=0.01, smoothing_limit=500, rescale=rescale)
    W_r, c_r = hebbian_update_reference(W, counts, h, t, gamma=0.01, smoothing_limit=500, rescale=rescale)
    assert torch.equal(c_k, c_r)
    torch.testing.assert_close(W_k.double(), W_r, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {gen.initial_seed()}: {m}")
    assert torch.equal(W_k[t[0]], W[t[0]])  # c ≥ T: untouched, bit for bit


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


@pytest.mark.parametrize("layer_cls,accumulate", [(FullSoftmax, 1), (HebbianSoftmax, 1), (HebbianSoftmax, 2)])
def test_layer_trains_identically_with_either_backend(gen, layer_cls, accumulate):
    """Five optimizer steps: the Triton backend (loss kernel, statistics kernel, mixing
    kernel) and the PyTorch backend reach the same weights, counts and losses."""
    steps = 5 * accumulate
    h_seq = [torch.randn(37, 24, generator=gen) for _ in range(steps)]
    t_seq = [make_inputs(gen, ignore_every=6)[3] for _ in range(steps)]
    a, la = _train(layer_cls, "triton", h_seq, t_seq, gen.initial_seed(), accumulate)
    b, lb = _train(layer_cls, "torch", h_seq, t_seq, gen.initial_seed(), accumulate)
    assert a.uses_triton(a.weight) and not b.uses_triton(b.weight)
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
    assert_matches(grads_triton(h, W, b, t, "mean"), grads_reference(h, W, b, t, "mean"), gen, "V=267,735", rtol=1e-3, atol=1e-4)


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


def test_benchmark_script_runs_in_smoke_mode(tmp_path):
    """The GPU benchmark is one command away; --smoke runs its code path on CPU (interpreter, tiny shapes)."""
    from conftest import run_script

    out = tmp_path / "bench.json"
    run_script("benchmarks/bench_linear_cross_entropy.py", "--smoke", "--out", str(out), check=True, timeout=300)
    import json

    rows = json.loads(out.read_text())["results"]
    expected = {"lmmem-triton", "eager"} | ({"F.linear_cross_entropy"} if hasattr(torch.nn.functional, "linear_cross_entropy") else set())
    assert {r["method"] for r in rows} == expected and all(r.get("ms", 0) > 0 for r in rows), rows


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


def test_a_kernel_that_cannot_compile_here_names_the_way_around():
    from triton.runtime.errors import OutOfResources

    from lmmem.errors import LmmemError
    from lmmem.kernels.runtime import launch

    class Kernel:  # stands in for a JIT function whose launch fails on an untested GPU
        __name__ = "_forward_kernel"

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    with pytest.raises(LmmemError, match="--softmax-backend torch"):
        launch(Kernel(), (1,))
