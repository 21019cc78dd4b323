"""Paths in committed results: relative to the project, or a name, never this machine's absolute path.

Results JSON and pages under ``docs/results`` are read on other machines: ``/work/runs/x`` or
``/tmp/data`` means nothing there (and tells the reader about the machine that ran it). The runners
store paths through :func:`portable_path` and their command lines through :func:`portable_command`:

* a path inside the project: relative to the project root (``docs/results/x.json``);
* a path in the shared corpora folder beside the project: ``../shared/data/NAME`` (where the
  project's docs say the corpora live);
* anything else (a work folder, a prepared corpus under /tmp): a placeholder (``WORK``, ``DATA``:
  the flag's name in capitals, which the page explains) or the folder's name.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import lmmem


def project_root() -> Path:
    """The checkout this lmmem runs from (the folder holding pyproject.toml), else the working directory."""
    root = Path(lmmem.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd().resolve()


def portable_path(path: str | os.PathLike, placeholder: str | None = None) -> str:
    """``path`` as committed results store it (see the module docstring); ``placeholder`` replaces a
    path outside the project and the shared corpora (default: the folder's or file's name)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    p = Path(os.path.normpath(p))
    root = project_root()
    if p == root or root in p.parents:
        return p.relative_to(root).as_posix() or "."
    shared = root.parent / "shared"
    if p == shared or shared in p.parents:
        return "../" + p.relative_to(root.parent).as_posix()
    return placeholder if placeholder is not None else p.name


def _placeholder(flag: str | None) -> str:
    return flag.lstrip("-").replace("-", "_").upper() if flag else "PATH"


def portable_command(argv: list[str], prefix: str = "python") -> str:
    """A command line for a results page: every absolute path in ``argv`` through :func:`portable_path`,
    a path outside the project replaced by its flag's name in capitals (``--work /tmp/x`` →
    ``--work WORK``). Relative paths are kept as typed (they are relative to the project already
    when run from its root). ``LABEL=/abs/path`` and ``--flag=/abs/path`` forms are handled too."""
    out: list[str] = []
    flag = None
    for arg in argv:
        if " " in arg.strip():  # a quoted list of flags (--prep-args "--vocab-from /x ..."): rewritten inside
            out.append(portable_command(shlex.split(arg), prefix=""))
        elif arg.startswith("-"):
            flag, sep, value = arg.partition("=")
            out.append(f"{flag}={portable_path(value, _placeholder(flag))}" if sep and _looks_absolute(value) else arg)
        else:
            label, sep, value = arg.partition("=")
            if sep and _looks_absolute(value) and not _looks_absolute(label):
                out.append(f"{label}={portable_path(value, _placeholder(flag))}")
            elif _looks_absolute(arg):
                out.append(portable_path(arg, _placeholder(flag)))
            else:
                out.append(arg)
    return " ".join([prefix, *(shlex.quote(a) for a in out)]) if prefix else shlex.join(out)


def _looks_absolute(text: str) -> bool:
    return text.startswith("/") or text.startswith("~")
