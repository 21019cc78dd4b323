"""The output folder of a corpus preparation: its lock, its staging folder, and what may be replaced.

Nothing lost (see ``lmmem.safety``): the corpus is built in a staging folder beside ``--out``
(``.NAME.staging``, same file system) and swapped in only once complete, so a failed, interrupted
or killed preparation leaves the previous corpus as it was; the old one is deleted after the swap.
A lock (``.NAME.lock`` beside ``--out``) makes a second preparation into the same ``--out`` exit 2
naming the first one's PID. A different corpus (other corpus, source or options in its meta.json)
is replaced only with ``--overwrite``; a folder holding anything but corpus files never is; an
``--out`` inside ``--source`` (or the reverse) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.id_files import TMP_SUFFIX
from lmmem.data.text_source import TextSource
from lmmem.errors import DataError
from lmmem.safety import FolderLock, is_inside

# Names a prepared corpus folder may hold (older versions also left these temp files in it).
CORPUS_FILES = ("meta.json", "vocab.txt", "spm.model", *(f"{s}.bin" for s in SPLITS))
LEGACY_TEMP_PATTERNS = (f".*{TMP_SUFFIX}", ".spm.tmp.*", "*.json.tmp", "vocab.txt.tmp")


def corpus_lock(out: Path, *, wait: bool = False) -> FolderLock:
    """The lock of corpus folder ``out``; its file sits beside ``out`` because ``out`` itself is swapped."""
    out = Path(out)
    return FolderLock(out.parent / f".{out.name}.lock", f"corpus folder {out}", wait=wait)


def staging_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.staging")


def _identity(meta: dict) -> tuple:
    return meta.get("corpus"), meta.get("source"), meta.get("options")


def check_source_overlap(out: Path, source: TextSource) -> None:
    """Refuse an --out inside --source (a re-run would read its own output as text) or around it."""
    src = Path(source.source)
    if not source.source.startswith("hub") and src.exists() and (is_inside(out, src) or is_inside(src, out)):
        raise DataError(
            f"--out {out} and --source {source.source} overlap: the output would be read as input (or the input replaced); "
            "choose an --out outside the source folder"
        )


def check_output_folder(out: Path, source: TextSource, options: dict, *, overwrite: bool) -> None:
    """Refuse an --out that would lose something: holding files that are not a corpus, or holding a
    different corpus without --overwrite. Call it holding the corpus lock."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in CORPUS_FILES)
    if foreign:
        raise DataError(
            f"--out {out} holds files that are not part of a prepared corpus ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); they would be lost: choose a new or empty folder"
        )
    meta_path = out / "meta.json"
    if not meta_path.is_file() or overwrite:
        return  # nothing there, or leftovers of an unfinished preparation, or replacing on request
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    new = {"corpus": source.corpus, "source": source.source, "options": options or {}}
    if not isinstance(old, dict) or _identity(old) != _identity(new):
        raise DataError(f"--out {out} holds {_difference(old, new)}; choose another --out, or pass --overwrite to replace it")


def _difference(old, new: dict) -> str:
    """What makes the corpus in a folder (``old``, its meta.json) another one than ``new``."""
    if not isinstance(old, dict) or not old:
        return "another prepared corpus (its meta.json is unreadable)"
    if old.get("corpus") != new["corpus"] or old.get("source") != new["source"]:
        return f"a different prepared corpus ({old.get('corpus')} from {old.get('source')})"
    was, now = old.get("options") or {}, new["options"]
    keys = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    shown = "; ".join(f"{_flag(k)} {_value(now.get(k))} here, {_value(was.get(k))} there" for k in keys[:4])
    return f"the same corpus prepared with other options ({shown}{'; ...' if len(keys) > 4 else ''})"


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _value(v) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)
