"""The torch device a ``--device`` flag names (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

A base module: training, evaluation and the checkpoint loader all take the same flag, and none of
them is the owner of the others.
"""

from __future__ import annotations

import torch

from lmmem.errors import LmmemError



def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``auto``: the process's GPU (``cuda:LOCAL_RANK``) when one is visible, else the CPU."""
    if flag == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise LmmemError(f"--device {flag} asked for CUDA but no GPU is visible; use --device cpu")
    if flag == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(flag)
    except RuntimeError:
        raise LmmemError(f"--device must be auto, cpu, cuda or cuda:N, not {flag!r}") from None
