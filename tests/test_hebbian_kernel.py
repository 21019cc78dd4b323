"""The centred rule's Triton step (lmmem.kernels.hebbian_centred) against the float64 specification.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), fp32, on
odd shapes (D = 23 and 37 with 16-wide blocks, a single block at D = 8; a few classes and many),
with repeated labels, ignored positions, saturated rows and first sightings; inputs are fresh random
numbers on every run (the seed is in the failure message). Each check also asserts that the kernel
really ran (no silent fallback to PyTorch).

Tolerances (fp32 kernel vs float64): every quantity is an fp32 sum of at most D ≤ 37 products or
of at most N ≤ 41 slot sums, so its relative error is below ~41·2⁻²⁴ ≈ 2.4e-6 in the worst case
(observed: ~1e-7); the written part is a ratio of two such norms times a difference. With O(1)
inputs, rtol = atol = 1e-5 leaves a few times the worst case and fails on any real slip (a stale μ,
a missing projection, a wrong λ move rows by ≥ 1e-2).

The GPU-only tests at the end (bf16/fp16 weights, the WikiText-103 vocabulary, determinism, no
host sync in the layer's update) skip without CUDA.
"""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from lmmem.kernels import hebbian_centred as centred_mod  # noqa: E402
from lmmem.kernels.hebbian import hebbian_statistics  # noqa: E402
from lmmem.kernels.hebbian_centred import hebbian_centred_update_  # noqa: E402
from lmmem.kernels.hebbian_rule import hebbian_lambda, hebbian_update_reference  # noqa: E402
from lmmem.kernels.runtime import KernelFallbackWarning, kernel_health, reset_kernel_health  # noqa: E402
from lmmem.output_layers import HebbianSoftmax  # noqa: E402

IGNORE = -100
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-only: bf16/fp16 and large shapes are wrong or too slow in Triton's CPU interpreter")
GAMMA, T = 0.05, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(autouse=True)
def fresh_kernel_health():
    reset_kernel_health()
    yield
    reset_kernel_health()


def make_batch(gen, N, D, V, offset=1.5):
    """Activations with a shared mean component (as real ones have); targets with one class many
    times, the last class, and ignored positions (never position 0)."""
    h = torch.randn(N, D, generator=gen) + offset * torch.randn(D, generator=gen)
    t = torch.randint(0, V - 1, (N,), generator=gen)  # t[0] (repeated below) is not the last class
    t[::3] = t[0]
    t[1::7] = V - 1
    t[4::5] = IGNORE
    return h, t


def make_state(gen, V, D, k, first=False):
    """Rows, counts (some past T, the repeated class fresh: a first sighting) and the running state:
    zero at the first update, random afterwards."""
    W = torch.randn(V, D, generator=gen) * 0.7
    counts = torch.randint(0, 9, (V,), generator=gen)
    mu = torch.zeros(D) if first else torch.randn(D, generator=gen)
    rho = torch.zeros(()) if first else torch.rand((), generator=gen) + 0.5
    return W, counts, mu, rho


def expected(W, counts, mu, rho, h, t, k, decay, write_norm, start_step, class_lambda=None):
    """The step in float64: the running statistics restated here, the write by hebbian_update_reference."""
    keep = t != IGNORE
    mu64, rho64 = mu.double(), float(rho)
    if keep.any():
        rate = max(1 - decay, 1 / (k + 1))
        mu64 = mu64 + rate * (h[keep].double().mean(0) - mu64)
        ids, n = t[keep].unique(return_counts=True)
        u = mu64 / mu64.norm() if float(mu64.norm()) > 0 else torch.zeros_like(mu64)
        rows = W.double()[ids]
        perp = (rows - (rows @ u)[:, None] * u).norm(dim=1)
        rho64 = rho64 + rate * (float((perp * n).sum() / n.sum()) - rho64)
    if start_step == 0 or k >= start_step:
        W_ref, c_ref = hebbian_update_reference(W, counts, h, t, GAMMA, T, IGNORE, rule="centred", activation_mean=mu64,
                                                write_norm=write_norm, running_norm=rho64, class_lambda=class_lambda)
    else:
        W_ref = W.double()
        c_ref = counts + torch.bincount(t[keep], minlength=W.shape[0])
    return W_ref, c_ref, mu64, rho64


def kernel_step(W, counts, mu, rho, h, t, k, decay, write_norm, start_step, class_lambda=None):
    V = W.shape[0]
    ids, n, sums = hebbian_statistics(h, t, V, IGNORE)
    safe = ids.clamp(max=V - 1)
    lam = hebbian_lambda(counts[safe], GAMMA, T, torch.float32) if class_lambda is None else class_lambda[safe].float()
    state = [W.clone(), counts.clone(), mu.clone(), rho.clone()]
    hebbian_centred_update_(state[0], state[1], ids, n, sums, lam, state[2], state[3], torch.tensor(k), start_step, decay,
                            write_norm)
    assert kernel_health() and all(kernel_health().values()), kernel_health()  # the kernels ran, nothing fell back
    return state


def check(got, want, gen, W, counts, t, schedule=True):
    W_k, c_k, mu_k, rho_k = got
    W_r, c_r, mu_r, rho_r = want
    msg = lambda m: f"seed {gen.initial_seed()}: {m}"  # noqa: E731
    assert torch.equal(c_k, c_r), msg("counts")
    torch.testing.assert_close(mu_k.double(), mu_r, **TOL, msg=msg)
    torch.testing.assert_close(float(rho_k), rho_r, **TOL, msg=msg)
    torch.testing.assert_close(W_k.double(), W_r, **TOL, msg=msg)
    present = torch.zeros(W.shape[0], dtype=torch.bool)
    present[t[t != IGNORE]] = True
    untouched = ~present | ((counts >= T) if schedule else torch.zeros_like(present))
    # absent classes and (with the schedule's λ) saturated rows, λ = 0: the optimizer's bits
    assert torch.equal(W_k[untouched], W[untouched]), msg("a row that must not move moved")


SHAPES = {"few-classes": (29, 23, 5), "many-classes": (41, 37, 211), "one-block": (13, 8, 17)}


@pytest.mark.parametrize("write_norm", ["running", "row", "none"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_matches_float64_reference_in_the_ema_regime(gen, shape, write_norm):
    N, D, V = SHAPES[shape]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=40)
    counts[t[0]] = 0  # a first sighting: λ = 1
    got = kernel_step(W, counts, mu, rho, h, t, 40, 0.9, write_norm, start_step=3)
    check(got, expected(W, counts, mu, rho, h, t, 40, 0.9, write_norm, 3), gen, W, counts, t)
    assert not torch.equal(got[0][t[0]], W[t[0]])  # the first sighting is written


@pytest.mark.parametrize("k", [0, 1, 2])
def test_first_updates_are_a_plain_mean_from_zero(gen, k):
    """k = 0: μ and ρ start at 0 and become this batch's; k = 1, 2 with β = 0.6: rates 1/2, then
    max(0.4, 1/3) = 0.4 (the switch to the EMA)."""
    N, D, V = SHAPES["few-classes"]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k, first=k == 0)
    got = kernel_step(W, counts, mu, rho, h, t, k, 0.6, "running", start_step=0)
    check(got, expected(W, counts, mu, rho, h, t, k, 0.6, "running", 0), gen, W, counts, t)


def test_warm_up_writes_no_row_but_counts_and_statistics_advance(gen):
    N, D, V = SHAPES["many-classes"]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=4)
    got = kernel_step(W, counts, mu, rho, h, t, 4, 0.9, "running", start_step=5)
    check(got, expected(W, counts, mu, rho, h, t, 4, 0.9, "running", 5), gen, W, counts, t)
    assert torch.equal(got[0], W) and not torch.equal(got[1], counts) and not torch.equal(got[2], mu)


def test_saturated_rows_are_kept_but_weigh_in_the_running_norm(gen):
    """Every class present is past T: λ = 0 everywhere, no row moves, yet μ and ρ advance over
    their rows (the reference counts them in the norm) and the counts keep counting."""
    N, D, V = SHAPES["few-classes"]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=9)
    counts += T
    got = kernel_step(W, counts, mu, rho, h, t, 9, 0.9, "row", start_step=0)
    check(got, expected(W, counts, mu, rho, h, t, 9, 0.9, "row", 0), gen, W, counts, t)
    assert torch.equal(got[0], W) and float(got[3]) != float(rho)


def test_a_zero_mean_gives_u_zero(gen):
    """μ = 0 after the update (two classes, activations x and −x, first update): u = 0, so nothing is
    kept along it and h̄ − μ = h̄ is written unprojected, at the running norm."""
    D, V = 23, 7
    x = torch.randn(D, generator=gen)
    h = torch.stack([x, -x, torch.randn(D, generator=gen)])
    t = torch.tensor([2, 5, IGNORE])
    W, counts, mu, rho = make_state(gen, V, D, k=0, first=True)
    counts.zero_()
    got = kernel_step(W, counts, mu, rho, h, t, 0, 0.9, "running", start_step=0)
    assert torch.equal(got[2], torch.zeros(D))
    check(got, expected(W, counts, mu, rho, h, t, 0, 0.9, "running", 0), gen, W, counts, t)


def test_a_batch_without_tokens_changes_nothing(gen):
    D, V = 23, 11
    h, t = torch.randn(6, D, generator=gen), torch.full((6,), IGNORE)
    W, counts, mu, rho = make_state(gen, V, D, k=3)
    got = kernel_step(W, counts, mu, rho, h, t, 3, 0.9, "running", start_step=0)
    assert torch.equal(got[0], W) and torch.equal(got[1], counts) and torch.equal(got[2], mu) and torch.equal(got[3], rho)


def test_lambda_is_an_input(gen):
    """A λ the schedule would never give (random per class, some exactly 0 or 1) is what the kernel
    applies: it equals the reference given that λ, and differs from the schedule's result."""
    N, D, V = SHAPES["many-classes"]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=12)
    class_lambda = torch.rand(V, generator=gen, dtype=torch.float64)
    class_lambda[t[1]] = 0.0  # the last class: kept
    class_lambda[t[0]] = 1.0  # the repeated class: replaced by its target
    got = kernel_step(W, counts, mu, rho, h, t, 12, 0.9, "running", 0, class_lambda=class_lambda)
    want = expected(W, counts, mu, rho, h, t, 12, 0.9, "running", 0, class_lambda=class_lambda)
    check(got, want, gen, W, counts, t, schedule=False)
    assert torch.equal(got[0][t[1]], W[t[1]])
    schedule = expected(W, counts, mu, rho, h, t, 12, 0.9, "running", 0)[0]
    assert not torch.allclose(got[0].double(), schedule, rtol=1e-3, atol=1e-3)


class _FailAtFullSize:
    """Stands in for a kernel that compiles for the probe's tiny grid but fails at full size."""

    def __init__(self, real, max_grid: int):
        self.real, self.max_grid, self.failures = real, max_grid, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if grid[0] > self.max_grid:
                self.failures += 1
                raise RuntimeError("OutOfResources: shared memory")
            self.real[grid](*args, **kwargs)
        return run


def test_a_kernel_failing_at_full_size_falls_back_once_with_the_state_intact(gen, monkeypatch):
    """The mix kernel (the last of the four) fails after the first three ran: the step is redone in
    PyTorch from untouched μ and ρ (they are staged), with one warning, and Triton is not tried again."""
    from lmmem.kernels import triton_kernels

    failing = _FailAtFullSize(triton_kernels.centred_mix_kernel, max_grid=5)  # the probe has 5 slots
    fake = types.SimpleNamespace(**{**vars(triton_kernels), "centred_mix_kernel": failing})
    monkeypatch.setattr(centred_mod, "runtime_kernels", lambda: fake)
    N, D, V = SHAPES["few-classes"]
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=7)
    ids, n, sums = hebbian_statistics(h, t, V, IGNORE)
    lam = hebbian_lambda(counts[ids.clamp(max=V - 1)], GAMMA, T, torch.float32)
    state = [W.clone(), counts.clone(), mu.clone(), rho.clone()]
    with pytest.warns(KernelFallbackWarning, match=r"hebbian_centred.*OutOfResources"):
        hebbian_centred_update_(state[0], state[1], ids, n, sums, lam, state[2], state[3], torch.tensor(7), 0, 0.9, "row")
    check(state, expected(W, counts, mu, rho, h, t, 7, 0.9, "row", 0), gen, W, counts, t)
    assert failing.failures == 1 and [v for k, v in kernel_health().items() if k[0] == "hebbian_centred"] == [False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hebbian_centred_update_(*[x.clone() for x in state[:2]], ids, n, sums, lam, *[x.clone() for x in state[2:]],
                                torch.tensor(8), 0, 0.9, "row")
    assert failing.failures == 1


# -- the layer -------------------------------------------------------------------------------------


def _layer(backend, seed, write_norm):
    torch.manual_seed(seed)
    layer = HebbianSoftmax(23, 31, gamma=GAMMA, smoothing_limit=T, rule="centred", write_norm=write_norm, mean_decay=0.6,
                           start_step=1, backend=backend).to(DEVICE).train()
    layer.counts.copy_(torch.randint(0, 9, (31,)))
    return layer, torch.optim.SGD(layer.parameters(), lr=0.5)


@pytest.mark.parametrize("write_norm,accumulate", [("running", 1), ("row", 2)])
def test_layer_triton_update_equals_torch_update_and_reference(gen, write_norm, accumulate):
    """HebbianSoftmax with backend="triton" (fused loss, Triton statistics and the centred kernels)
    and backend="torch" over 4 steps — warm-up, plain mean, EMA — with gradient accumulation in one
    case: the same counts, running state and rows; each Triton step also equals the float64 reference
    given its own rows after the optimizer step."""
    seed = gen.initial_seed()
    (a, opt_a), (b, opt_b) = _layer("triton", seed, write_norm), _layer("torch", seed, write_norm)
    mu, rho = torch.zeros(23, dtype=torch.float64), 0.0
    for k in range(4):
        parts = [make_batch(gen, 17, 23, 31) for _ in range(accumulate)]
        for layer, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            for h, t in parts:
                layer.loss(h.to(DEVICE), t.to(DEVICE)).backward()
            opt.step()
        W_hat, c_before = a.weight.detach().cpu().clone(), a.counts.cpu().clone()
        h, t = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        want = expected(W_hat, c_before, mu.float(), torch.tensor(rho), h, t, k, 0.6, write_norm, 1)
        _, _, mu, rho = want
        a.hebbian_update_()
        b.hebbian_update_()
        got = [a.weight.detach().cpu(), a.counts.cpu(), a.activation_mean.cpu(), a.running_row_norm.cpu()]
        check(got, want, gen, W_hat, c_before, t)
        assert torch.equal(a.counts, b.counts) and int(a.updates) == int(b.updates) == k + 1
        for x, y in ((a.weight, b.weight), (a.activation_mean, b.activation_mean), (a.running_row_norm, b.running_row_norm)):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert any(v[0] == "hebbian_centred" for v in kernel_health()) and all(kernel_health().values())


def test_layer_triton_path_scales_the_momentum_as_the_torch_path(gen):
    """write_momentum="scale" (the default) under Adam: the Triton statistics carry sentinel slots, the
    torch path filtered ids; both scale the same rows of exp_avg by 1 − λ, over warm-up and writes."""
    seed = gen.initial_seed()
    layers = []
    for backend in ("triton", "torch"):
        torch.manual_seed(seed)
        layer = HebbianSoftmax(23, 31, gamma=GAMMA, smoothing_limit=T, rule="centred", start_step=1, backend=backend).to(DEVICE).train()
        layers.append((layer, torch.optim.Adam(layer.parameters(), lr=0.05)))
    assert layers[0][0].write_momentum == "scale"
    for _ in range(4):
        h, t = make_batch(gen, 17, 23, 31)
        for layer, opt in layers:
            opt.zero_grad()
            layer.loss(h.to(DEVICE), t.to(DEVICE)).backward()
            opt.step()
            layer.on_optimizer_step(opt)
    (a, opt_a), (b, opt_b) = layers
    torch.testing.assert_close(opt_a.state[a.weight]["exp_avg"], opt_b.state[b.weight]["exp_avg"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.weight.detach(), b.weight.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(a.counts, b.counts)


def test_mixing_rates_are_the_schedule_and_ignore_sentinels():
    layer = HebbianSoftmax(4, 6, gamma=0.1, smoothing_limit=5)
    layer.counts.copy_(torch.tensor([0, 1, 3, 5, 9, 2]))
    lam = layer.mixing_rates(torch.tensor([0, 1, 2, 3, 4, 6, 6]))
    torch.testing.assert_close(lam[:5], torch.tensor([1.0, 0.5, 0.25, 0.0, 0.0]))
    assert lam.shape == (7,) and lam.dtype == torch.float32


# -- GPU-only --------------------------------------------------------------------------------------


def _zipf_targets(gen, N, V):
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    t = torch.multinomial(1.0 / ranks, N, replacement=True, generator=gen)
    t[::17] = IGNORE
    return t


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_within_pytorchs_own_error(gen, dtype):
    """Weights (and the running state) in bf16/fp16: the kernels' error against float64 is at most
    twice that of the PyTorch statement run in the same dtype."""
    N, D, V = 2000, 256, 5003
    h, t = make_batch(gen, N, D, V)
    W, counts, mu, rho = make_state(gen, V, D, k=30)
    want = expected(W.to(dtype), counts, mu.to(dtype), rho.to(dtype), h, t, 30, 0.9, "running", 0)[0]
    ids, n, sums = hebbian_statistics(h.to(DEVICE), t.to(DEVICE), V, IGNORE)
    lam = hebbian_lambda(counts.to(DEVICE)[ids.clamp(max=V - 1)], GAMMA, T, torch.float32)
    errs = []
    for use_triton in (True, False):
        state = [x.to(DEVICE) for x in (W.to(dtype), counts, mu.to(dtype), rho.to(dtype))]
        hebbian_centred_update_(state[0], state[1], ids, n, sums, lam, state[2], state[3], torch.tensor(30, device=DEVICE),
                                0, 0.9, "running", use_triton=use_triton)
        errs.append((state[0].double().cpu() - want).abs().max().item())
    assert errs[0] <= 2 * errs[1] + 1e-6, f"{dtype}: ours {errs[0]:.3g} vs PyTorch's {errs[1]:.3g} (seed {gen.initial_seed()})"
    assert all(kernel_health().values()), kernel_health()


@needs_cuda
def test_wikitext103_vocabulary_matches_pytorch_and_is_deterministic(gen):
    N, D, V = 8192, 512, 267_735
    h = (torch.randn(N, D, generator=gen) + torch.randn(D, generator=gen)).to(DEVICE)
    t = _zipf_targets(gen, N, V).to(DEVICE)
    W, counts, mu, rho = (x.to(DEVICE) for x in make_state(gen, V, D, k=100))
    ids, n, sums = hebbian_statistics(h, t, V, IGNORE)
    lam = hebbian_lambda(counts[ids.clamp(max=V - 1)], 0.01, 500, torch.float32)
    runs = []
    for use_triton in (True, True, False):
        state = [W.clone(), counts.clone(), mu.clone(), rho.clone()]
        hebbian_centred_update_(state[0], state[1], ids, n, sums, lam, state[2], state[3], torch.tensor(100, device=DEVICE),
                                0, 0.99, "running", use_triton=use_triton)
        runs.append(state)
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1])), "two runs differ: not deterministic"
    assert torch.equal(runs[0][1], runs[2][1])
    for i in (0, 2, 3):  # rows, μ, ρ
        torch.testing.assert_close(runs[0][i], runs[2][i], rtol=1e-4, atol=1e-5)
    assert all(kernel_health().values()), kernel_health()


@needs_cuda
@pytest.mark.parametrize("rule", ["centred", "paper"])
def test_layer_update_has_no_host_sync(gen, rule):
    """After the first call (which probes the kernels, with syncs), the update — the centred rule's
    warm-up and writes, the paper rule's writes — never waits for the GPU."""
    layer = HebbianSoftmax(64, 1000, rule=rule, start_step=2 if rule == "centred" else 0).to(DEVICE).train()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)  # the centred rule also scales its momentum
    for step in range(4):
        h, t = torch.randn(300, 64, device=DEVICE), _zipf_targets(gen, 300, 1000).to(DEVICE)
        layer.loss(h, t).backward()
        opt.step()
        if step >= 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            layer.hebbian_update_(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(layer.updates) == 4 and all(kernel_health().values()), kernel_health()


@pytest.mark.slow
def test_benchmark_script_runs_in_smoke_mode(tmp_path):
    """The GPU timing (benchmarks/bench_hebbian_step.py, run by gpu_checks.sh) is one command away:
    --smoke runs every code path on CPU (interpreter, tiny shapes) and writes the per-rule rows."""
    import json

    from conftest import run_script

    out = tmp_path / "bench.json"
    run_script("benchmarks/bench_hebbian_step.py", "--smoke", "--out", str(out), check=True, timeout=600)
    update = json.loads(out.read_text())["update"]
    assert {(r["rule"], r["backend"]) for r in update["rows"]} == {(r, b) for r in ("paper", "centred") for b in ("torch", "triton")}
    assert set(update["ratios"]) == {"paper", "centred"} and not update["kernel_fallbacks"]
    assert all(r["update_ms"] > 0 for r in update["rows"])
