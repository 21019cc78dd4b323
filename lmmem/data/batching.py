"""Truncated-BPTT batching over one flat token stream.

The stream is cut into ``batch_size`` equally long rows laid side by side (row r holds a
contiguous stretch of text), and step j reads columns ``[j*bptt, (j+1)*bptt)`` of every row, so
the LSTM state carried from step j to j+1 continues the same text in each row.

Under data parallelism the *global* batch is cut the same way and rank k takes rows
``[k*B/W, (k+1)*B/W)``: training with W processes of B/W rows each sees exactly the rows one
process with B rows sees, which is what makes a multi-process run comparable to a single one.

Sliding window (``context`` C > 0, for models without a carried state, i.e. the Transformer):
step j still *scores* columns ``[j*bptt, (j+1)*bptt)`` of every row, but its inputs start C
positions earlier in the stream (in the previous row's text for a row's first columns), so every
scored token is predicted from at least C tokens of context besides its own input (fewer only at
the very start of the split). The C context positions have IGNORE_INDEX targets.

Only the slices a step needs are read from the (memmapped) stream, so a 4-billion-token split
costs no memory up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lmmem.constants import IGNORE_INDEX
from lmmem.errors import DataError


@dataclass
class Batch:
    inputs: torch.Tensor  # (rows, T) int64
    targets: torch.Tensor  # (rows, T) int64, IGNORE_INDEX on padding
    num_targets: int  # non-ignored targets in this rank's rows
    target_positions: np.ndarray | None = None  # (rows, T): index in the split of each target, -1 where ignored


class StreamBatcher:
    """Step-indexed BPTT batches; ``batch(j)`` is a pure function of j, so resuming at step j
    needs nothing but j.

    ``pad=False`` (training): each row has ``(len-1)//batch_size`` positions; the < batch_size
    positions left over at the end are dropped. ``pad=True`` (evaluation): rows have
    ``ceil((len-1)/batch_size)`` positions and the tail of the last rows is padded with
    IGNORE_INDEX, so every token of the split is scored exactly once.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, bptt: int, *, rank: int = 0, world_size: int = 1, pad: bool = False,
                 context: int = 0):
        if context < 0:
            raise DataError(f"--context must be 0 or more (got {context})")
        self.context = context
        if batch_size <= 0 or bptt <= 0:
            raise DataError(f"--batch-size and --bptt must be positive (got {batch_size}, {bptt})")
        if batch_size % world_size:
            raise DataError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size})")
        self.tokens = tokens
        self.positions = len(tokens) - 1  # (input, target) pairs in the stream
        self.batch_size = batch_size
        self.bptt = bptt
        self.pad = pad
        self.row_len = math.ceil(self.positions / batch_size) if pad else self.positions // batch_size
        if self.row_len < 1:
            raise DataError(
                f"the split has {len(tokens)} tokens, too few for --batch-size {batch_size}; use a smaller batch or more data"
            )
        per_rank = batch_size // world_size
        self.rows = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)
        self.num_steps = math.ceil(self.row_len / bptt)

    def __len__(self) -> int:
        return self.num_steps

    def input_positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(absolute stream position of every input of ``batch(step)``, (rows, T); which are real,
        not padding). The target of input position p is token p + 1."""
        start = step * self.bptt
        width = min(self.bptt, self.row_len - start)
        cols = start + np.arange(width, dtype=np.int64)
        pos = self.rows[:, None] * self.row_len + cols[None, :]
        valid = (pos < self.positions) & (cols[None, :] < self.row_len)
        return pos, valid

    def batch(self, step: int) -> Batch:
        pos, valid = self.input_positions(step)
        safe = np.where(valid, pos, 0)
        inputs = np.asarray(self.tokens[safe.ravel()], dtype=np.int64).reshape(safe.shape)
        targets = np.asarray(self.tokens[(safe + 1).ravel()], dtype=np.int64).reshape(safe.shape)
        targets[~valid] = IGNORE_INDEX
        tpos = np.where(valid, pos + 1, -1)
        if self.context:
            return self._with_context(pos, valid, pos.shape[1])
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), int(valid.sum()), tpos)

    def _with_context(self, pos: np.ndarray, valid: np.ndarray, width: int) -> Batch:
        """Windows of ``context + width`` inputs ending at each row's scored columns; the window of
        a scored position that has fewer than ``context`` tokens before it starts at the stream's start."""
        span = self.context + width
        first = np.maximum(pos[:, 0] - self.context, 0)  # absolute start of each row's window
        win = first[:, None] + np.arange(span, dtype=np.int64)[None, :]
        inside = win < self.positions
        safe = np.where(inside, win, 0)
        inputs = np.asarray(self.tokens[safe.ravel()], dtype=np.int64).reshape(safe.shape)
        targets = np.full(win.shape, IGNORE_INDEX, dtype=np.int64)
        tpos = np.full(win.shape, -1, dtype=np.int64)
        r, c = np.nonzero(valid)
        at = pos[r, c] - first[r]  # offset of each scored position in its row's window
        targets[r, at] = np.asarray(self.tokens[pos[r, c] + 1], dtype=np.int64)
        tpos[r, at] = pos[r, c] + 1
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), int(valid.sum()), tpos)
