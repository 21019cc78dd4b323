"""``--config FILE``: command-line flags read from a JSON or TOML file (standard library only).

The file is a mapping of option names (``batch_size`` or ``batch-size``, the long flag without its
dashes) to values. It may hold one section per command (``[train]``, ``[evaluate]``,
``[prepare]``); a command reads its own section, or the whole file when it has no sections.
A run's ``config.json`` (what ``train.py`` writes into the run folder: ``{"train": ..., "model":
...}``) can be passed back to ``train`` to train the same configuration again; its corpus path is
absolute (an older run's relative one is looked for where that run was started, see lmmem.paths).
Paths in other files mean what they would on the command line (relative to the current folder).

The values are turned into ``--flag=value`` words placed *before* the command line's own words,
so argparse parses both the same way (types, choices and required options are checked once, by
the same code) and a flag given on the command line wins, being read last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmmem.errors import LmmemError
from lmmem.paths import recorded_path_candidates

COMMANDS = ("train", "evaluate", "prepare")
# A run's config.json names the folder it was written into and whether it was a resumed run.
# Training again from it must not start over inside that run (it would replace its checkpoints
# and metrics), so those two are left to the new command line.
RUN_CONFIG_SKIPPED = ("out", "resume")
CONFIG_HELP = ("read options from a JSON or TOML file (keys: the long flags without dashes; a [train]/[evaluate]/"
               "[prepare] section per command; a run's config.json works); flags on the command line win")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None, help=CONFIG_HELP)


def read_config_file(path: str | Path, command: str) -> dict:
    """The option mapping ``command`` takes from the file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LmmemError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib  # the standard library from Python 3.11 on
            except ImportError:
                raise LmmemError(f"--config {path}: reading TOML needs Python 3.11 or later; write the options as JSON") from None
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON (name the file .toml for TOML)"
        raise LmmemError(f"--config {path} is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise LmmemError(f"--config {path} must hold a mapping of option names to values, not a {type(data).__name__}")
    sections = [k for k in data if k in (*COMMANDS, "model") and isinstance(data[k], dict)]
    if not sections:
        return data
    if command not in data:
        raise LmmemError(f"--config {path} has no [{command}] section (it has: {', '.join(sections)})")
    values = dict(data[command])
    if command == "train" and "model" in data:  # a run's config.json
        if isinstance(values.get("data"), str):  # written before paths were stored absolute: find it
            tried = recorded_path_candidates(values["data"], path.parent, values.get("out"))
            values["data"] = str(next((p for p in tried if p.is_dir()), values["data"]))
        for key in RUN_CONFIG_SKIPPED:
            values.pop(key, None)
    return values


def config_words(values: dict, parser: argparse.ArgumentParser, source: str) -> tuple[list[str], dict]:
    """(``--flag=value`` words, defaults for optional positionals) for ``values``."""
    words: list[str] = []
    positional: dict = {}
    by_dest = {a.dest: a for a in parser._actions}  # argparse has no public accessor for its actions
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None:
            pos = by_dest.get(str(key).replace("-", "_"))
            if pos is not None and not pos.option_strings and pos.nargs == "?":
                positional[pos.dest] = value
                continue
            raise LmmemError(f"{source}: unknown option {key!r} (use the long flags of --help without the dashes)")
        if key == "config" or value is None:
            continue
        if action.nargs == 0:  # a switch: store_true / store_false / --x/--no-x
            if not isinstance(value, bool):
                raise LmmemError(f"{source}: {key} is a switch; give true or false, not {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                words.append(flag if value else "--no-" + flag[2:])
            elif value == action.const:  # store_true (const True) or store_false (const False)
                words.append(flag)
            continue  # otherwise the switch's default is the value asked for
        items = value if isinstance(value, list) else [value]
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and action.nargs in ("*", "+")):
            raise LmmemError(f"{source}: {key} takes one value, not {value!r}")
        texts = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in items]
        if action.nargs in ("*", "+"):
            words += [flag, *texts]
        else:
            words.append(f"{flag}={texts[0]}")
    return words, positional


def argv_with_config(argv: list[str], parser: argparse.ArgumentParser, command: str, *, insert_at: int = 0) -> list[str]:
    """``argv`` with the options of its ``--config FILE`` (if any) inserted at ``insert_at``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[insert_at:])
    if not known.config:
        return list(argv)
    words, positional = config_words(read_config_file(known.config, command), parser, f"--config {known.config}")
    if positional:
        parser.set_defaults(**positional)
    return [*argv[:insert_at], *words, *argv[insert_at:]]
