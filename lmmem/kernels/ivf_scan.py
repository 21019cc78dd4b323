"""The fused exact scan of an IVF index's probed lists on a CPU (``ivf_scan.cpp``): built on first
use, probed, and replaced by the torch scan wherever it cannot run.

Why native: the torch scan (:mod:`lmmem.memories.knn_scan`, the reference) computes each list's
``(queries, keys)`` distance table with several tensor operations (norms, comparison with the bound,
``nonzero``, gathers, top-k), which cost more than its matrix products at the paper's k = 1,024.
The C++ op keeps the products as BLAS matmuls and reads each table row once, comparing and keeping
in the same loop (see the comment at the top of ``ivf_scan.cpp`` for the selection and why its
result does not depend on the order of the lists).

Built with ``torch.utils.cpp_extension`` into ``$LMMEM_CACHE/native`` (``~/.cache/lmmem/native``),
once per machine: the folder's name holds a digest of the source, the flags, torch's version and the
CPU's instruction-set flags (the build is ``-march=native`` on x86-64), so a home folder shared by
different machines never loads a build made for another CPU. A flock beside the folder keeps two
processes from building it at once, and a build killed half-way (kill -9) blocks no later one.

**bf16 products** (``ivf_scan_screened``). Where the CPU has bf16 matrix units (AMX: Intel Xeon
since Sapphire Rapids) and torch's build exports MKL's bf16 GEMM, the products run in bf16 with fp32
sums, several times faster than fp32's. They only screen: a rigorous bound on their rounding
brackets each key's fp32 distance, and every key the bound cannot rule out gets its fp32 distance
before the top-k is taken, so the neighbours and distances are the fp32 scan's (to the rounding of
a sum in another order). The keys then also take a bf16 copy (half the fp32 residuals' memory).
By default they run on AMX for keys at least ``BF16_MIN_DIM`` wide (narrower keys spend less on
products than re-checking costs). ``LMMEM_NATIVE_BF16=0`` keeps fp32 products; ``=1`` uses bf16 ones
at every width and without AMX too (MKL emulates them: correct, slower), as the tests do.

Never failing hard, as :mod:`lmmem.kernels.runtime` for Triton: the first use builds the op and runs
it on a small problem against a float64 brute force. A build that fails (no C++ compiler, no Python
headers) or a wrong result warns once (:class:`NativeScanWarning`) and the torch scan runs for the
rest of the process, with the same neighbours. ``LMMEM_NATIVE=0`` switches the native op off. The
bf16 op is probed the same way; where it fails, the fp32 op runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from lmmem.safety import FolderLock

SOURCE = Path(__file__).with_name("ivf_scan.cpp")
# built into the same extension (one build, one probe of the toolchain): MbPA's fused restricted
# adaptation (lmmem/kernels/mbpa_native.py) and the logits' row normalisers (lmmem/kernels/row_lse.py)
SOURCES = (SOURCE, Path(__file__).with_name("mbpa_adapt.cpp"), Path(__file__).with_name("row_lse.cpp"))
HEADERS = (Path(__file__).with_name("native_math.h"),)  # included by the sources: in the build's digest
NAME = "lmmem_ivf_scan"  # the TORCH_LIBRARY namespace in ivf_scan.cpp: torch.ops.lmmem_ivf_scan.ivf_scan
POOL_MIN_EXTRA = 256  # a pool holds at least k + this many candidates: a shrink every ≥ max(k, 256) appends
# bf16 products by default from this key width (on AMX): at k = 1,024 they made evaluation faster at
# d = 768 and slower at d = 64 and 128 (docs/results/knn-lm.md); widths in between are not measured
BF16_MIN_DIM = 512


class NativeScanWarning(RuntimeWarning):
    """The native IVF scan could not be built or failed its probe here; the torch scan runs instead
    (the same neighbours, slower at large k)."""


def native_enabled() -> bool:
    """Not switched off by ``LMMEM_NATIVE=0``."""
    return os.environ.get("LMMEM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def pool_size(k: int) -> int:
    """Candidates a query's pool holds in the op (``cap``): twice k, and at least ``k + POOL_MIN_EXTRA``.
    Each full pool is cut back to its k nearest; a larger pool cuts less often and takes more memory
    (8 bytes an entry)."""
    return max(2 * k, k + POOL_MIN_EXTRA)


def verified(op, probe, what: str, instead: str):
    """``op`` where ``probe(op)`` returns without raising, else None, with one warning naming
    ``what`` failed, the cause and what runs ``instead``; None where the op did not build (the
    build warned already). For the extension's other ops, each with its own probe."""
    if op is None:
        return None
    try:
        probe(op)
        return op
    except Exception as e:  # noqa: BLE001 - any failure means: the torch statement runs
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"{what} is not used here ({type(e).__name__}: {cause}); {instead}", RuntimeWarning, stacklevel=5)
        return None


def native_scan_op():
    """``torch.ops.lmmem_ivf_scan.ivf_scan`` where it builds and passes its probe; else None."""
    return _load() if native_enabled() else None


def bf16_products(dim: int) -> bool:
    """Whether the scan of ``dim``-wide keys should multiply in bf16 (``ivf_scan_screened``):
    ``LMMEM_NATIVE_BF16`` 0/1 where set, else where the CPU has AMX's bf16 tiles (elsewhere MKL
    emulates bf16 products, at no gain) and ``dim ≥ BF16_MIN_DIM`` (narrow keys: the products are
    a small share of the scan, and re-checking costs more than bf16 saves)."""
    choice = os.environ.get("LMMEM_NATIVE_BF16", "auto").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    if choice in ("1", "true", "yes", "on"):
        return True
    return dim >= BF16_MIN_DIM and "amx_bf16" in _cpu_flags().split()


def screened_scan_op():
    """``torch.ops.lmmem_ivf_scan.ivf_scan_screened`` where the native op loads, torch's build has
    MKL's bf16 GEMM, and it passes its probe; else None (see :func:`bf16_products` for when to use it)."""
    return _load_screened() if native_scan_op() is not None else None


def _cflags() -> list[str]:
    native = platform.machine().lower() in ("x86_64", "amd64")  # -march=native: the build runs where it is used
    # -fno-trapping-math: loops with a clamp before a float-to-int conversion vectorise (MbPA's
    # exponential); it changes no result, only whether floating-point exception flags are kept
    return ["-O3", "-fno-trapping-math"] + (["-march=native"] if native else [])


@functools.lru_cache(maxsize=None)  # a fact about the machine: /proc/cpuinfo is read once, not per search
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_folder(flags: list[str]) -> Path:
    digest = hashlib.sha256()
    for part in (*(src.read_bytes() for src in SOURCES + HEADERS), " ".join(flags).encode(), torch.__version__.encode(), _cpu_flags().encode(),
                 sys.version.encode()):
        digest.update(part)
    cache = Path(os.environ.get("LMMEM_CACHE", Path.home() / ".cache" / "lmmem"))
    return cache / "native" / f"{NAME}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _ninja_on_path():
    """torch builds with the ``ninja`` it finds on PATH; the pip package's binary sits in the
    environment's bin folder, which is not on PATH when ``.venv/bin/python`` runs unactivated."""
    before = os.environ.get("PATH", "")
    try:
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, before])
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = before


@functools.lru_cache(maxsize=None)  # a fact about this process's machine, like runtime's kernel verdicts
def _load():
    try:
        from torch.utils import cpp_extension

        flags = _cflags()
        folder = _build_folder(flags)
        if _loaded_elsewhere(folder):  # a second copy of the library would abort the process
            return _probed(torch.ops.lmmem_ivf_scan.ivf_scan)
        folder.mkdir(parents=True, exist_ok=True)
        # Builds run under lmmem's own flock, which the kernel drops when its holder dies. torch's
        # baton file inside the folder is then never contended, so one found there was left by a
        # build that was killed, and torch would wait on it forever: it is removed.
        with FolderLock(folder.parent / f"{folder.name}.lock", "the native IVF scan's build folder", wait=True):
            (folder / "lock").unlink(missing_ok=True)
            if not (folder / f"{NAME}.so").exists():
                print(f"lmmem: building the native ops (the IVF scan, MbPA's scoring, the logits' normalisers) in {folder} "
                      "(once per machine, ~30 s)",
                      file=sys.stderr)
            with _ninja_on_path():
                cpp_extension.load(NAME, [str(src) for src in SOURCES], extra_cflags=flags, build_directory=str(folder),
                                   is_python_module=False, verbose=False)
        return _probed(torch.ops.lmmem_ivf_scan.ivf_scan)
    except Exception as e:  # noqa: BLE001 - any failure to build or run means: use the torch scan
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"the native IVF scan (and MbPA's and the logits' native ops) is not used here ({type(e).__name__}: "
                      f"{cause}); their torch statements run instead (the kNN scan: same neighbours; MbPA and the "
                      f"normalisers: the same results to fp32 rounding; all slower). LMMEM_NATIVE=0 skips the attempt.",
                      NativeScanWarning, stacklevel=3)
        return None


def _loaded_elsewhere(folder: Path) -> bool:
    """Whether this process already holds the library, loaded from another build folder (the cache
    folder moved, e.g. ``LMMEM_CACHE`` changed after the first load). A library registers its ops
    once per process: loading a second copy aborts it, so the first copy serves."""
    mine = [Path(p) for p in torch.ops.loaded_libraries if Path(p).name.startswith(NAME)]
    return bool(mine) and all(p.parent != folder for p in mine)


def _probed(op):
    if not _probe_ok(op, *_probe_problem()):
        raise RuntimeError("its result on a probe problem differs from a float64 brute force")
    return op


@functools.lru_cache(maxsize=None)
def _load_screened():
    try:
        ops = torch.ops.lmmem_ivf_scan
        if not ops.has_bf16_gemm():
            raise RuntimeError("this torch build does not export MKL's bf16 GEMM (cblas_gemm_bf16bf16f32)")
        if not _probe_ok(_screened_as_plain(ops.ivf_scan_screened), *_probe_problem()):
            raise RuntimeError("its result on a probe problem differs from a float64 brute force")
        return ops.ivf_scan_screened
    except Exception as e:  # noqa: BLE001 - the fp32 op runs instead
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"the native IVF scan's bf16 products are not used here ({type(e).__name__}: {cause}); "
                      f"multiplying in fp32 instead (same neighbours). LMMEM_NATIVE_BF16=0 skips the attempt.",
                      NativeScanWarning, stacklevel=3)
        return None


def screen_keys(residuals: torch.Tensor, chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``ivf_scan_screened`` needs beside the fp32 residuals ``r``: their bf16 copy ``r~``
    (rounded to nearest), ``|r - r~|`` and ``|r~| + |r - r~|`` per key (the terms of its bound),
    computed ``chunk`` rows at a time (no temporary of the residuals' size)."""
    count = residuals.shape[0]
    low = torch.empty(residuals.shape, dtype=torch.bfloat16)
    err = torch.empty(count, dtype=torch.float32)
    wide = torch.empty(count, dtype=torch.float32)
    for start in range(0, count, chunk):
        rows = residuals[start:start + chunk]
        low[start:start + chunk] = rows.to(torch.bfloat16)
        back = low[start:start + chunk].to(torch.float32)
        err[start:start + chunk] = torch.linalg.vector_norm(rows - back, dim=1)  # the differences are exact
        wide[start:start + chunk] = torch.linalg.vector_norm(back, dim=1) + err[start:start + chunk]
    return low, err, wide


def _screened_as_plain(op):
    """``op`` (ivf_scan_screened) with ivf_scan's arguments: the bf16 copy made on the fly (the probe)."""
    def run(queries, probed, centroids, residuals, norms, starts, k, cap):
        low, err, wide = screen_keys(residuals)
        return op(queries, probed, centroids, residuals, low, norms, err, wide, starts, k, cap)
    return run


def _probe_problem():
    """A small IVF layout (uneven lists, one empty, one holding a repeated key) with queries and k
    chosen so that the pools are cut back several times and one query's lists hold fewer than k keys."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([300, 0, 41, 7, 150])
    dim, nlist = 13, len(sizes)
    centroids = 3 * torch.randn(nlist, dim, generator=g)
    residuals = torch.randn(int(sizes.sum()), dim, generator=g)
    residuals[5] = residuals[4]
    starts = torch.zeros(nlist + 1, dtype=torch.int64)
    starts[1:] = sizes.cumsum(0)
    norms = (residuals * residuals).sum(1)
    queries = centroids[torch.tensor([0, 2, 4, 3])] + torch.randn(4, dim, generator=g)
    probed = torch.tensor([[0, 2, 4], [2, 0, 1], [4, 3, 0], [3, 1, 2]])
    return queries, probed, centroids, residuals, norms, starts, 60


def _probe_ok(op, queries, probed, centroids, residuals, norms, starts, k) -> bool:
    d, pos = op(queries, probed, centroids, residuals, norms, starts, k, pool_size(k))
    list_of = torch.repeat_interleave(torch.arange(len(centroids)), starts[1:] - starts[:-1])
    keys = (residuals + centroids[list_of]).double()
    for i in range(len(queries)):
        held = torch.isin(list_of, probed[i])
        dist = ((queries[i].double() - keys) ** 2).sum(1).masked_fill(~held, float("inf"))
        ref = dist.sort().values[:k]
        n = int(torch.isfinite(ref).sum())
        if (pos[i, n:] != -1).any() or not torch.isinf(d[i, n:]).all():
            return False
        if not torch.allclose(d[i, :n].double(), ref[:n], rtol=1e-4, atol=1e-3):
            return False
        if not torch.allclose(dist[pos[i, :n]], ref[:n], rtol=1e-4, atol=1e-3):  # each position at its distance
            return False
    return True
