"""The one scoring loop: windows of a token stream → model adapter → methods → sinks.

:func:`run_pass` reads the batches of a window convention (:mod:`lmmem.evaluation.windows`) in
order. For each it runs the model (:mod:`lmmem.evaluation.adapters`: hidden states and the
log-probability of every target), mixes in the test-time memories for every point of their grid
(:mod:`lmmem.evaluation.methods`) and hands the per-target log-probabilities to the sinks
(:mod:`lmmem.evaluation.sinks`: bucketed sums for every grid point, per-token columns for the
methods that are reported). With ``dynamic`` the pass is dynamic evaluation (Krause et al. 2018):
a copy of the model scores each batch, then takes one gradient step on it
(:mod:`lmmem.evaluation.dynamic`), and the memories read the adapting model's hidden states.

The model is left as it was (its training mode restored; dynamic evaluation works on a copy).
Memory does not grow with the length of the stream unless per-token columns are asked for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.evaluation.adapters import Adapter
from lmmem.evaluation.dynamic import DynamicConfig, dynamic_step, rms_scales
from lmmem.evaluation.methods import MemorySet, MemoryView
from lmmem.evaluation.buckets import autocast_context
from lmmem.evaluation.sinks import GridSums, TokenColumns
from lmmem.evaluation.windows import Group
from lmmem.output_layers.base import IGNORE_INDEX

HINT_STEPS = 10  # dynamic evaluation compared with the static model on this many first batches
HINT_MARGIN = 1e-3  # ... and said to be worse when its loss there is this much higher (relative)


@dataclass
class DynamicRun:
    """Dynamic evaluation in a pass: the update rule and (rms) the training gradient statistics."""

    cfg: DynamicConfig
    statistics: dict | None = None
    hint: bool = False  # compare with the static model on the first batches and say so when it is worse


@dataclass
class PassResult:
    sums: GridSums
    columns: TokenColumns | None
    seconds: float
    memory_bytes: dict = field(default_factory=dict)
    diverged: bool = False
    notes: list[str] = field(default_factory=list)


class _Dynamic:
    """The adapting copy of the model and its update."""

    def __init__(self, adapter: Adapter, run: DynamicRun):
        self.cfg = run.cfg
        self.adapter = adapter.copy()
        self.params = dict(self.adapter.model.named_parameters())
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.scales = None
        if run.cfg.method == "rms":
            if run.statistics is None:
                raise ValueError("the rms variant needs training data for its gradient statistics")
            self.scales = rms_scales(run.statistics, decay=run.cfg.decay, eps=run.cfg.eps)

    def step(self, lp: torch.Tensor, valid: torch.Tensor) -> bool:
        """One update from the batch's log-probabilities; False (and no update) when the loss is not finite."""
        loss = -lp[valid].sum() / valid.sum().clamp_min(1)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        dynamic_step(self.params, self.theta0, self.cfg, self.scales)
        return True


class _Hint:
    """Sums dynamic and static NLL over the first batches; one line when dynamic evaluation is worse."""

    def __init__(self, adapter: Adapter, steps: int = HINT_STEPS):
        self.adapter, self.steps, self.state = adapter, steps, None
        self.dynamic = self.static = 0.0
        self.seen = 0
        self.note: str | None = None

    @torch.no_grad()
    def add(self, batch_inputs, targets, lp_dynamic, valid, new_group: bool, lr: float) -> None:
        if self.seen >= self.steps:
            return
        if new_group or self.state is None:
            self.state = self.adapter.init_state(batch_inputs.shape[0])
        fwd = self.adapter.forward(batch_inputs, self.state)
        self.state = fwd.state
        lp, _ = self.adapter.target_log_probs(fwd, targets)
        self.dynamic += float(-lp_dynamic.detach().double()[valid].sum())
        self.static += float(-lp.double()[valid].sum())
        self.seen += 1
        if self.seen == self.steps and self.dynamic > self.static * (1 + HINT_MARGIN):
            n = int(valid.sum()) * self.steps
            self.note = (f"dynamic evaluation at --dynamic-lr {lr:g} is worse than the plain model on the first {self.steps} "
                         f"batches (~{n:,} tokens: loss {self.dynamic / max(n, 1):.3f} vs {self.static / max(n, 1):.3f}); "
                         "choose the learning rate on the valid split with --tune")


def run_pass(
    adapter: Adapter,
    groups: list[Group],
    memories: MemorySet,
    sums: GridSums,
    *,
    columns: TokenColumns | None = None,
    dynamic: DynamicRun | None = None,
    progress=None,
    amp_dtype: torch.dtype | None = None,
    on_scores=None,
    on_note=None,
) -> PassResult:
    """Score every batch of ``groups``; returns the sums (and columns) filled in.

    ``on_scores(positions, log_probs)``: each batch's scored targets' stream positions and their
    log-probabilities (float64, first grid point: the model alone), for callers that record them
    themselves. ``on_note(line)``: a remark worth printing at once (dynamic evaluation worse than
    the static model on the first batches)."""
    t0 = time.monotonic()
    model = adapter.model
    was_training = model.training
    model.eval()
    dyn = _Dynamic(adapter, dynamic) if dynamic is not None else None
    runner = dyn.adapter if dyn is not None else adapter
    hint = _Hint(adapter, min(HINT_STEPS, sum(g.steps for g in groups))) if dynamic is not None and dynamic.hint else None
    if memories.needs_hidden:
        problem = runner.hidden_problem()
        if problem:
            raise LmmemError(problem)
    head = runner.head() if memories.needs_hidden else None
    result = PassResult(sums, columns, 0.0)
    device = runner.device
    try:
        with torch.set_grad_enabled(dyn is not None):
            for gi, g in enumerate(groups):
                state = runner.init_state(g.rows)  # stateful (LSTM) models come in bptt rows: one row a stream
                # the memories keep fp32 keys at least (a bf16 model's cache scores would lose their digits)
                memories.start_group(g.rows, runner.dim, device=device, dtype=torch.promote_types(runner.dtype, torch.float32))
                for step in range(g.steps):
                    batch = g.batch(step)
                    ok, state = _score_batch(runner, batch, state, memories, head, sums, columns, dyn, amp_dtype, on_scores,
                                             hint, new_group=step == 0)
                    if progress is not None:
                        progress.update(1)
                    if hint is not None and hint.note:
                        result.notes.append(hint.note)
                        if on_note is not None:
                            on_note(hint.note)
                        hint = None
                    if not ok:
                        result.diverged = True
                        sums.nll.fill_(math.inf)
                        return _finish(result, memories, t0)
                if gi == 0:
                    result.memory_bytes = memories.nbytes()
    finally:
        model.train(was_training)
    return _finish(result, memories, t0)


def _finish(result: PassResult, memories: MemorySet, t0: float) -> PassResult:
    result.seconds = time.monotonic() - t0
    return result


def _score_batch(runner: Adapter, batch, state, memories: MemorySet, head, sums: GridSums, columns, dyn, amp_dtype, on_scores,
                 hint, new_group: bool):
    device = runner.device
    x = batch.inputs.to(device, non_blocking=True)
    y = batch.targets.to(device, non_blocking=True)
    yf = y.reshape(-1)
    if dyn is not None:
        dyn.adapter.model.zero_grad(set_to_none=True)
    with autocast_context(device, amp_dtype):
        fwd = runner.forward(x, state)
    state = runner.detach_state(fwd.state) if dyn is not None else fwd.state
    lp_raw, logits = runner.target_log_probs(fwd, yf, want_logits=memories.needs_logits)
    valid = yf != IGNORE_INDEX
    with torch.no_grad():
        lp = lp_raw.detach().double()
        if memories.memories:
            view = MemoryView(fwd.hidden.detach(), y, batch.order, lp, head,
                              logits.detach() if logits is not None else None, lp if logits is not None else None)
            mixed = memories.mix(lp, view)
        else:
            mixed = lp[None]
        positions = batch.positions.reshape(-1)[valid.cpu().numpy()]
        scored = mixed[:, valid]
        sums.add(positions, yf[valid], scored)
        if columns is not None:
            columns.add(positions, scored)
        if on_scores is not None:
            on_scores(positions, scored[0])
    if hint is not None:
        hint.add(x, yf, lp_raw, valid, new_group, dyn.cfg.lr)
    if dyn is not None and not dyn.step(lp_raw, valid):
        return False, state
    return True, state


@torch.no_grad()
def training_pairs(adapter: Adapter, tokens: np.ndarray, n: int, *, bptt: int, with_lse: bool):
    """The model's (hidden state, next token) pairs over the last ``n + 1`` tokens of ``tokens``,
    read as one stream from a fresh state in chunks of ``bptt``: keys ``(n', D)``, values ``(n',)``
    and, with ``with_lse``, each key's log-normaliser (``n' = min(n, len(tokens) − 1)``). MbPA's
    memory "optionally filled from training data" starts with them."""
    model = adapter.model
    was_training = model.training
    model.eval()
    tail = torch.as_tensor(np.asarray(tokens[-(n + 1):], dtype=np.int64), device=adapter.device)
    state = adapter.init_state(1)
    keys, values, lses = [], [], []
    head = adapter.head()
    try:
        for start in range(0, tail.numel() - 1, bptt):
            y = tail[start + 1 : start + 1 + bptt]
            x = tail[start : start + bptt][None][:, : y.numel()]
            fwd = adapter.forward(x, state)
            state = fwd.state
            h = fwd.hidden[0]
            keys.append(h)
            values.append(y)
            if with_lse:
                lses.append(torch.logsumexp(head.logits(h).double(), -1))
    finally:
        model.train(was_training)
    return torch.cat(keys), torch.cat(values), (torch.cat(lses) if with_lse else None)
