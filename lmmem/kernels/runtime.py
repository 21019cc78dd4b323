"""Whether a Triton kernel may run, and the guarantee that a failing one never stops a run.

Triton compiles kernels for CUDA GPUs. On CPU tensors its kernels run only in the interpreter,
which Triton reads from the environment variable ``TRITON_INTERPRET=1`` — it must be set before
``triton`` is imported (the test suite's conftest does this when there is no GPU). The interpreter
is slow and computes bf16 wrongly, so it is for testing small fp32 shapes only.

Never failing hard
------------------
A kernel that has never run on the user's GPU / triton version can fail in many ways (a
CompilationError, OutOfResources, a PTXASError, a launcher that does not build, a RuntimeError from
a compiler pass, a result that is wrong). So the first time a *variant* of a kernel is needed (its
dtype and compile-time flags: the things that make Triton compile a new binary), :func:`kernel_ok`
compiles and runs it on a tiny problem, in every direction it will be used in, and compares it with
the PyTorch statement of the same step. On any exception or mismatch it warns once, naming the
variant and the cause, and reports the variant unusable for the rest of the process: the callers
then take their PyTorch path, which computes the same thing. A failure at full size (after a
passing probe) is caught by :func:`guarded` and handled the same way.

``LMMEM_TRITON=0`` in the environment switches every Triton kernel off (the PyTorch paths run).

The verdicts live in one module-level dict: a cache of facts about this process's GPU and triton
(like torch's own kernel caches), not configuration; :func:`reset_kernel_health` clears it (tests).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Hashable

import torch

from lmmem.errors import LmmemError
from lmmem.kernels import triton_kernels
from lmmem.kernels.triton_kernels import tl, triton

__all__ = ["tl", "triton", "triton_enabled", "interpreter_enabled", "triton_usable", "require_triton",
           "kernel_ok", "guarded", "mark_failed", "reset_kernel_health", "device_guard", "runtime_kernels",
           "KernelFallbackWarning"]


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel variant failed here; lmmem uses its PyTorch path instead (same results)."""


_HEALTH: dict[Hashable, bool] = {}
_LOCK = threading.Lock()


def triton_enabled() -> bool:
    """triton is importable and not switched off by ``LMMEM_TRITON=0``."""
    return triton is not None and os.environ.get("LMMEM_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """True where a Triton kernel can run on tensors of ``device``."""
    if not triton_enabled():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def require_triton(device: torch.device) -> None:
    """For a caller that *forces* Triton: an error naming the way around when it cannot run here."""
    if triton is None:
        raise LmmemError("the Triton kernels need the 'triton' package (pip install triton; Linux only); "
                         "or let lmmem choose (backend='auto' / use_triton=None: the chunked PyTorch path runs anywhere)")
    if not triton_enabled():
        raise LmmemError("Triton is switched off by LMMEM_TRITON=0; unset it, or use backend='auto' (use_triton=None)")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise LmmemError("Triton kernels run on CPU tensors only in the Triton interpreter: set TRITON_INTERPRET=1 "
                             "before triton is imported (slow, fp32 only; for tests), or use backend='auto' "
                             "(use_triton=None), which runs the chunked PyTorch path on CPU")
        return
    raise LmmemError(f"the Triton kernels run on CUDA (and CPU under TRITON_INTERPRET=1), not {device.type} tensors; "
                     "use backend='auto' (use_triton=None): the chunked PyTorch path runs on any device")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    last = text.splitlines()[-1][:200] if text else ""
    return f"{type(exc).__name__}: {last}" if last else type(exc).__name__


def mark_failed(variant: Hashable, exc: BaseException | str) -> None:
    """Record ``variant`` as unusable and warn once (the message names it and the cause)."""
    cause = exc if isinstance(exc, str) else _describe(exc)
    with _LOCK:
        first = _HEALTH.get(variant) is not False
        _HEALTH[variant] = False
    if first:
        warnings.warn(f"lmmem: the Triton kernel variant {variant} failed here ({cause}); using the PyTorch path "
                      "for it for the rest of this process (same results, slower). Please report it with your "
                      "triton version and GPU; LMMEM_TRITON=0 silences this by not trying Triton.",
                      KernelFallbackWarning, stacklevel=3)


def kernel_ok(variant: Hashable, probe: Callable[[], None]) -> bool:
    """Whether ``variant`` may be used: on first call, run ``probe`` (compile + run every direction
    on a tiny problem; raise on a wrong result) and remember the verdict."""
    verdict = _HEALTH.get(variant)
    if verdict is not None:
        return verdict
    try:
        probe()
    except Exception as e:  # anything at all: the point is never to stop a training run
        mark_failed(variant, e)
        return False
    with _LOCK:
        _HEALTH.setdefault(variant, True)
        return _HEALTH[variant]


def guarded(variant: Hashable, launch: Callable[[], None]) -> bool:
    """Run ``launch``; on an exception mark ``variant`` failed and return False (the caller then
    redoes the work on its PyTorch path)."""
    try:
        launch()
        return True
    except Exception as e:
        mark_failed(variant, e)
        return False


def reset_kernel_health() -> None:
    with _LOCK:
        _HEALTH.clear()


def kernel_health() -> dict:
    """A copy of the verdicts so far (variant → usable), for reports and tests."""
    with _LOCK:
        return dict(_HEALTH)


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it ``device`` (the tensors' own)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def runtime_kernels():
    """The module the launchers take their kernels from: :mod:`lmmem.kernels.triton_kernels`. An
    indirection, so that a test can hand one launcher module (``monkeypatch.setattr(launchers,
    "runtime_kernels", ...)``) failing stand-ins and exercise the fallbacks above."""
    return triton_kernels
