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


def portable_path(path: str | os.PathLike, placeholder: str | None = None, anchors: dict | None = None) -> str:
    """``path`` as committed results store it (see the module docstring). ``anchors`` maps folders to
    names (``{work: "WORK"}``: ``WORK/full-seed1/best.pt``); ``placeholder`` replaces any other path
    outside the project and the shared corpora (default: the folder's or file's name)."""
    p = _normal(path)
    for folder, name in (anchors or {}).items():
        folder = _normal(folder)
        if p == folder or folder in p.parents:
            return "/".join([name, *p.relative_to(folder).parts])
    root = project_root()
    if p == root or root in p.parents:
        return p.relative_to(root).as_posix() or "."
    shared = root.parent / "shared"
    if p == shared or shared in p.parents:
        return "../" + p.relative_to(root.parent).as_posix()
    return placeholder if placeholder is not None else p.name


def _normal(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else Path.cwd() / p))


def _placeholder(flag: str | None) -> str:
    return flag.lstrip("-").replace("-", "_").upper() if flag else "PATH"


def portable_command(argv: list[str], prefix: str = "python", anchors: dict | None = None) -> str:
    """A command line for a results page: every absolute path in ``argv`` through :func:`portable_path`
    (``anchors`` as there), any other path outside the project replaced by its flag's name in capitals
    (``--data /tmp/x`` → ``--data DATA``). Relative paths are kept as typed (relative to the project
    when run from its root). ``LABEL=/abs/path``, ``--flag=/abs/path`` and a quoted list of flags
    (``--prep-args "--vocab-from /x"``) are rewritten too."""
    out: list[str] = []
    flag = None
    for arg in argv:
        if " " in arg.strip() and arg.strip().startswith("-"):
            out.append(portable_command(shlex.split(arg), prefix="", anchors=anchors))
        elif arg.startswith("-"):
            flag, sep, value = arg.partition("=")
            out.append(f"{flag}={portable_path(value, _placeholder(flag), anchors)}" if sep and _looks_absolute(value) else arg)
        else:
            label, sep, value = arg.partition("=")
            if sep and _looks_absolute(value) and not _looks_absolute(label):
                out.append(f"{label}={portable_path(value, _placeholder(flag), anchors)}")
            elif _looks_absolute(arg):
                out.append(portable_path(arg, _placeholder(flag), anchors))
            else:
                out.append(arg)
    return " ".join([prefix, *(shlex.quote(a) for a in out)]) if prefix else shlex.join(out)


def portable_shell(command: str, anchors: dict | None = None) -> str:
    """:func:`portable_command` for a whole command string; a leading Python executable
    (``/path/.venv/bin/python``) becomes ``python``."""
    argv = shlex.split(command)
    if not (argv and Path(argv[0]).name.startswith("python")):
        return portable_command(argv, "", anchors)
    if argv[1:2] == ["-m"] and len(argv) > 2:
        return portable_command(argv[3:], f"python -m {argv[2]}", anchors)
    return portable_command(argv[1:], "python", anchors)


def _looks_absolute(text: str) -> bool:
    return text.startswith("/") or text.startswith("~")
