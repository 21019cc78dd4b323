"""Shared CLI wrapper: user errors become one line on stderr and exit status 2, no traceback.

Exit statuses: 0 done, 2 a problem with the input, the options or the file system (one ``error:``
line naming the fix), 3 training diverged (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing

from lmmem.errors import LmmemError, TrainingDiverged
from lmmem.safety import describe_os_error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not state its default already and there is
    one to state (argparse's own formatter printed "(default: 3) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return text
        return super()._get_help_string(action)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a text"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: every error is ONE line naming the fix (the valid
    choices, the closest flag), exit status 2 — argparse prints its whole usage block first — and
    no abbreviated flags (``--max-step 5`` would otherwise silently mean ``--max-steps 5``, and a
    later flag sharing the prefix would change what an old command line does)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.explain(message)}\n")

    def explain(self, message: str) -> str:
        """argparse's message rewritten to say what to do instead."""
        hint = f"see {self.prog} --help"
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            words = m.group(1).split()
            flags = [w for w in words if w.startswith("-")]
            if not flags:
                return f"unexpected argument {words[0]!r} ({hint})"
            options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            name = flags[0].split("=", 1)[0]
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            if close:
                return f"unknown option {name}: did you mean {close[0]}? ({hint})"
            return f"unknown option {name} ({hint})"
        m = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        if m:
            flag, value, choices = m.groups()
            names = [c.strip().strip("'") for c in choices.split(",")]
            close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
            guess = f" (did you mean {close[0]}?)" if close else ""
            return f"{flag} {value!r} is not one of its choices: {', '.join(names)}{guess}"
        m = re.match(r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.*)$", message)
        if m:
            flag, kind, value = m.groups()
            return f"{flag} takes {_TYPE_WORDS.get(kind, kind)}, not {value}"
        m = re.match(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        if m:
            return f"{m.group(1)} needs a value ({hint})"
        return f"{message} ({hint})"


def add_dataclass_arguments(parser, cls, *, prefix: str = "", skip: tuple[str, ...] = (), defaults_from_class: bool = True,
                            group=None) -> dict[str, str]:
    """One flag per field of the dataclass ``cls`` (``batch_size`` → ``--PREFIXbatch-size``), so a
    command line and the config it fills cannot drift apart. Per field, ``metadata`` may hold
    ``help`` (stated once; the default is appended unless the help states it), ``choices`` (the
    constant that defines them, shown in the usage line) and ``cli=False`` (no flag). ``bool``
    fields become ``--x/--no-x``. With ``defaults_from_class=False`` every flag defaults to None
    ("not given"), for configs where a preset decides what an absent flag means.
    Returns ``{dest: field name}`` for :func:`dataclass_from_args`."""
    target = group if group is not None else parser
    hints = typing.get_type_hints(cls)
    dests: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        has_default = f.default is not dataclasses.MISSING
        default = f.default if has_default else None
        help_text = f.metadata.get("help", "")
        if "default" not in help_text and default is not None and default is not False:
            help_text += f" (default: {default})"
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = (prefix.replace("-", "_") + f.name)
        kind = hints[f.name]
        arg_default = default if defaults_from_class else None
        if kind is bool:
            target.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=arg_default, help=help_text)
        else:
            base = _scalar_type(kind)
            choices = f.metadata.get("choices")
            target.add_argument(flag, dest=dest, type=base, default=arg_default, help=help_text,
                                choices=list(choices) if choices is not None else None,
                                metavar=f.metadata.get("metavar"))
        dests[dest] = f.name
    return dests


def dataclass_from_args(cls, args, dests: dict[str, str], **extra):
    """``cls(**values)`` from the parsed ``args`` for the flags :func:`add_dataclass_arguments`
    added (absent ones, None, left to the dataclass default); a ValueError of the config's own
    checks becomes a one-line LmmemError."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    given = {name: values[dest] for dest, name in dests.items() if values.get(dest) is not None}
    try:
        return cls(**given, **extra)
    except ValueError as e:
        raise LmmemError(str(e)) from None


def _scalar_type(kind):
    """The argparse ``type`` of a field annotation: ``int``, ``float``, ``str``, or the non-None
    member of ``X | None``."""
    if kind in (int, float, str):
        return kind
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, str):
        return args[0]
    return str


def run_cli(main, argv=None) -> int:
    try:
        return main(argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except LmmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a path that is a file: the environment, not a bug
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
