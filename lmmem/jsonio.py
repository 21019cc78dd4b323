"""JSON that is always valid: non-finite numbers are refused, never written.

Python's ``json`` writes ``Infinity`` and ``NaN`` by default, which no strict JSON reader (jq,
JavaScript, pandas with ``orient``) accepts, and which hide a diverged result behind exit
status 0. Every JSON file lmmem writes goes through :func:`dumps`, which raises
:class:`LmmemError` naming the first offending key instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmmem.errors import LmmemError
from lmmem.safety import write_text_atomic


def first_non_finite(obj, path: str = "") -> str | None:
    """Dotted path of the first inf/NaN float in ``obj`` (dicts, lists, tuples), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "<value>")
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = first_non_finite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = first_non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def dumps(obj, *, what: str = "the results", **kw) -> str:
    """``json.dumps`` with ``allow_nan=False``; a non-finite number raises LmmemError naming it."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        where = first_non_finite(obj)
        if where is None:
            raise
        raise LmmemError(f"{what} hold a non-finite number at {where} (the computation diverged); nothing was written. "
                         f"If it is a test-time method, lower its learning rate or use --tune") from None


def write_json(obj, path: str | Path, *, what: str | None = None) -> None:
    """Write JSON atomically (temp file + rename); refuse non-finite numbers before touching ``path``."""
    path = Path(path)
    text = dumps(obj, what=what or f"the results for {path}", indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)  # fsynced temp file + rename; an OSError names ``path``
