"""Plain perplexity of a token stream, bucketed by the target's training frequency: the entry point
the trainer's validation and the experiments call (:func:`score_stream`), now the evaluation
engine's plain path (lmmem.evaluation.engine) with lmmem's ``bptt`` layout.

Scoring streams the split in BPTT chunks and keeps only per-bucket sums (float64) on the device,
so memory does not grow with the length of the split. The per-token log-probabilities behind those
sums can be kept as well through an ``on_scores(positions, log_probs)`` hook (:class:`TokenLogProbs`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.evaluation.adapters import LmmemAdapter
from lmmem.evaluation.engine import run_pass
from lmmem.evaluation.methods import MemorySet
from lmmem.evaluation.sinks import GridSums
from lmmem.evaluation.windows import BpttWindows
from lmmem.progress import Progress


def score_stream(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    bucket_of: np.ndarray,
    num_buckets: int,
    batch_size: int = 16,
    bptt: int = 128,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    max_tokens: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "eval",
    context: int = 0,
    on_scores: Callable[[np.ndarray, torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket (NLL sum, token count) of this rank's rows of the stream.

    Every position of the stream is scored exactly once across ranks (rows are padded, padding is
    ignored). The model runs in eval mode (no dropout, no Hebbian statistics) and is put back in
    the mode it was in. Sum the returned arrays over ranks for the global figures.

    ``context`` C > 0 (Transformer only): a row-wise sliding window, fairseq's
    ``--context-window``; each step scores ``bptt`` new positions per row from a window of
    ``C + bptt`` inputs, so every token is predicted from at least C tokens before its input (fewer
    only at the split's start). (``evaluate.py --context`` is Hugging Face's strided window
    instead, lmmem.evaluation.windows.SlidingWindows.) ``on_scores(positions, log_probs)``
    receives each batch's scored targets (see TokenLogProbs).
    """
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    adapter = LmmemAdapter(model)
    if context and adapter.carries_state:
        raise LmmemError("--context (a sliding window) is for the Transformer: an LSTM carries its state from chunk to chunk, "
                         "so every token already sees all the text before it in its row; drop --context")
    windows = BpttWindows(tokens, batch_size=batch_size, bptt=bptt, context=context,
                          shard=(rank, world_size) if world_size > 1 else None)
    groups = windows.groups()
    sums = GridSums(1, num_buckets, device=torch.device(device), bucket_of_vocab=bucket_of)
    with Progress(sum(g.steps for g in groups), desc, unit="batches", enabled=progress) as bar:
        run_pass(adapter, groups, MemorySet([]), sums, progress=bar, amp_dtype=amp_dtype, on_scores=on_scores)
    return sums.arrays(0)
