"""Paths a run records (its corpus, its checkpoint): absolute when written, so that a run can be
evaluated, exported or trained again from any folder; older relative ones resolved when read.

Before this rule, ``train.py --data data/gutenberg --out runs/x`` stored ``data/gutenberg`` as
typed, which means something only in the folder train.py ran in. That folder is recoverable: the
run folder's absolute path ends with the ``out`` it recorded (``/home/u/proj/runs/x`` and
``runs/x``), and what is left (``/home/u/proj``) is where train.py ran. A recorded relative path is
therefore looked for there first, then in the current folder (where it was looked for before); a
wrong guess is caught by the vocabulary fingerprint every reader checks.
"""

from __future__ import annotations

import os
from pathlib import Path


def absolute(path: str | Path) -> str:
    """``path`` made absolute against the current folder, symlinks kept (the user's name for it)."""
    return os.path.abspath(os.path.expanduser(str(path)))


def origin_of(run_dir: str | Path, recorded_out: str | None) -> Path | None:
    """The folder a run was started in: ``run_dir`` without the trailing parts of the relative
    ``out`` it recorded; None when ``out`` was absolute, missing, or does not end ``run_dir``."""
    if not isinstance(recorded_out, str) or not recorded_out or os.path.isabs(recorded_out):
        return None
    run_dir = Path(absolute(run_dir))
    parts = [p for p in Path(recorded_out).parts if p != "."]
    if not parts or ".." in parts or len(parts) >= len(run_dir.parts) or list(run_dir.parts[-len(parts):]) != parts:
        return None
    return Path(*run_dir.parts[: -len(parts)])


def recorded_path_candidates(saved: str, run_dir: str | Path | None = None, recorded_out: str | None = None) -> list[Path]:
    """Where a recorded path may be, in the order to try: itself if absolute; else under the
    folder the run was started in (see :func:`origin_of`), then under the current folder."""
    path = Path(os.path.expanduser(saved))
    if path.is_absolute():
        return [path]
    origin = origin_of(run_dir, recorded_out) if run_dir is not None else None
    found = [origin / path] if origin is not None else []
    here = Path(absolute(path))
    return found + ([here] if here not in found else [])
