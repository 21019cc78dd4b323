"""Importing Triton, and the one place that decides whether a tensor can go to a Triton kernel.

Triton compiles kernels for CUDA GPUs. On CPU tensors its kernels run only in the interpreter,
which Triton reads from the environment variable ``TRITON_INTERPRET=1`` — it must be set before
``triton`` is imported (the test suite's conftest does this when there is no GPU). The interpreter
is slow and computes bf16 wrongly, so it is for testing small fp32 shapes only.
"""

from __future__ import annotations

import os

import torch

from lmmem.errors import LmmemError

try:  # triton is a Linux-only dependency of lmmem; the torch backends work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None

_LAUNCH_ERRORS: tuple[type[BaseException], ...] = ()
if triton is not None:
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        _LAUNCH_ERRORS = (CompilationError, OutOfResources)
    except ImportError:  # pragma: no cover - other triton layouts
        pass


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """True where a Triton kernel can run on tensors of ``device``."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def require_triton(device: torch.device) -> None:
    if triton is None:
        raise LmmemError("the Triton backend needs the 'triton' package (pip install triton; Linux only); "
                         "or use backend='torch' (--softmax-backend torch)")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise LmmemError("Triton kernels run on CPU tensors only in the Triton interpreter: set TRITON_INTERPRET=1 "
                             "before triton is imported (slow, fp32 only; for tests), or use backend='torch' on CPU")
        return
    raise LmmemError(f"the Triton backend supports CUDA (and CPU under TRITON_INTERPRET=1), not {device.type} tensors; "
                     "use backend='torch'")


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, turning a failure to compile or fit the kernel on this GPU
    (a Triton version or GPU we have not tested) into an error that names the way around it."""
    try:
        kernel[grid](*args, **kwargs)
    except _LAUNCH_ERRORS as e:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise LmmemError(f"the Triton kernel {name} could not be compiled or launched here ({type(e).__name__}: {first}); "
                         "use the PyTorch implementation meanwhile (backend='torch', train.py --softmax-backend torch) "
                         "and report the triton version and GPU") from e
