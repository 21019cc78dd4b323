"""Bounded, streaming reading of corpus files (plain or gzip-compressed).

Every corpus reader goes through :func:`iter_blocks`, which hands out the file as blocks of
about 1 MiB that always end at a line break. That gives three guarantees the rest of
``data_prep`` relies on:

* memory does not grow with the file: one block (plus at most one unfinished line) is held;
* a file with no line breaks (a 100 MB "line") is refused with a one-line error naming the file,
  the line and ``--max-line-chars`` instead of being read whole into memory;
* a byte sequence that is not valid in the chosen encoding is reported with its file and line
  (the block is decoded at once and the error offset mapped back to a line number), with the
  ``--encoding-errors replace`` way out.

Line ends are normalised to ``\\n`` (``\\r\\n`` and lone ``\\r`` as in Python's universal
newlines) and a leading byte-order mark is dropped.
"""

from __future__ import annotations

import codecs
import gzip
import io
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmmem.errors import DataError

BLOCK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ReadOptions:
    encoding: str = "utf-8"
    encoding_errors: str = "strict"  # "replace": bad bytes become U+FFFD; "fallback": see _decode_lines
    max_line_chars: int = 1_000_000  # longest line held in memory (counted in bytes before decoding)


def require_folder(path: Path, what: str) -> Path:
    """The corpus folder, or a DataError that says what to pass instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus folder {path} does not exist; pass the folder that holds {what} with --source")
    if not path.is_dir():
        raise DataError(f"--source {path} is a file, not a folder; pass the folder that holds {what}")
    return path


def _progress_update(progress, raw: BinaryIO, last: int) -> int:
    if progress is None:
        return last
    pos = raw.tell()
    progress.update(pos - last)
    return pos


FALLBACK_CP1252 = "cp1252 (fallback)"
FALLBACK_LATIN1 = "latin-1 (fallback)"


def _decode_lines_with_fallback(block: bytes, encoding: str, lines: Counter | None = None) -> str:
    """``--encoding-errors fallback``: a line that is not valid in ``encoding`` is read as
    Windows-1252, or Latin-1 where that fails (old Project Gutenberg etexts and newswire often
    carry a few such lines: ``Caesar`` with an ``ae`` ligature, ``cafe`` with an accent).
    ``lines`` counts the lines read each way."""
    out = []
    pieces = block.split(b"\n")
    used = Counter()
    for line in pieces:
        try:
            out.append(line.decode(encoding))
            used[encoding] += 1
        except UnicodeDecodeError:
            try:
                out.append(line.decode("cp1252"))
                used[FALLBACK_CP1252] += 1
            except UnicodeDecodeError:
                out.append(line.decode("latin-1"))
                used[FALLBACK_LATIN1] += 1
    if lines is not None:
        used[encoding] -= 1  # the block ends with a line break: the last piece is not a line
        lines.update(used)
    return "\n".join(out)


def _decode(block: bytes, name: str, first_line: int, opts: ReadOptions, lines: Counter | None = None) -> str:
    fallback = opts.encoding_errors == "fallback"
    try:
        text = block.decode(opts.encoding, "strict" if fallback else opts.encoding_errors)
        if lines is not None:
            lines[opts.encoding] += block.count(b"\n")
    except UnicodeDecodeError as e:
        if not fallback:
            line = first_line + block.count(b"\n", 0, e.start)
            col = e.start - (block.rfind(b"\n", 0, e.start) + 1) + 1
            raise DataError(
                f"{name}:{line}: byte {block[e.start:e.start + 1]!r} at column {col} is not valid {opts.encoding} ({e.reason}); "
                "fix the file, or pass --encoding-errors fallback (read such lines as Windows-1252/Latin-1) "
                "or --encoding-errors replace (read such bytes as U+FFFD)"
            ) from None
        text = _decode_lines_with_fallback(block, opts.encoding, lines)
    except LookupError:
        raise DataError(f"unknown --encoding {opts.encoding!r}; use a Python codec name such as utf-8 or latin-1") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def iter_blocks(
    source: str | Path | BinaryIO,
    opts: ReadOptions,
    *,
    name: str | None = None,
    progress=None,
    block_bytes: int = BLOCK_BYTES,
    lines: Counter | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield ``(line number of the block's first line, text)``; each text ends with ``\\n``.

    ``source`` is a path (gzip is recognised by its magic bytes, whatever the file is called) or
    an open binary file. ``progress`` (a tqdm bar counting bytes) advances by the bytes read from
    disk, compressed bytes for gzip files. ``lines``, when given, counts the lines decoded with
    each codec (``opts.encoding``, or the per-line fallbacks of ``--encoding-errors fallback``).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or str(path)
        try:
            raw = open(path, "rb")
        except OSError as e:
            raise DataError(f"cannot read {path} ({e.strerror}); check --source") from None
    else:
        raw, name = source, name or getattr(source, "name", "<stream>")
    limit = max(1, opts.max_line_chars)
    # A block never needs to be larger than the line limit: reading less keeps what is held to
    # about two limits' worth when a user sets a small --max-line-chars.
    size = min(block_bytes, limit)
    with raw:
        f: BinaryIO = raw
        if raw.read(2) == GZIP_MAGIC:
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            raw.seek(0)
        carry: list[bytes] = []  # pieces of a line that has not ended yet
        carry_len = 0
        lineno = 1
        last = 0
        first = True
        while True:
            try:
                data = f.read(size)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{name} is not a readable gzip file ({e}); re-download or re-compress it") from None
            last = _progress_update(progress, raw, last)
            if not data:
                if carry_len:
                    text = _decode(b"".join(carry) + b"\n", name, lineno, opts, lines)
                    yield lineno, (text.lstrip("\ufeff") if first else text)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry.append(data)
                carry_len += len(data)
                if carry_len > limit:
                    raise DataError(
                        f"{name}:{lineno}: line is longer than {limit:,} bytes with no line break "
                        f"(is this a text corpus?); split the file into lines, or raise --max-line-chars"
                    )
                continue
            block = b"".join(carry) + data[:cut] if carry else data[:cut]
            rest = data[cut:]
            carry, carry_len = ([rest], len(rest)) if rest else ([], 0)
            text = _decode(block, name, lineno, opts, lines)
            if first:
                text = text.lstrip("\ufeff")
                first = False
            yield lineno, text
            lineno += block.count(b"\n")


def text_as_file(text: str, name: str) -> io.BytesIO:
    """A hub record's text as a binary file, so that it goes through the same bounded reader."""
    f = io.BytesIO(text.encode("utf-8"))
    f.name = name
    return f


def nth_line_end(text: str, n: int, start: int = 0) -> int:
    """Offset just past the ``n``-th line break at or after ``start`` (``len(text)`` if fewer)."""
    pos = start
    for _ in range(n):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    return pos


# ---------------------------------------------------------------------------------------------
# declared encodings (Project Gutenberg headers)

DECLARED_RE = re.compile(rb"^[ \t]*Character[ \t]+set[ \t]+encoding:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.MULTILINE | re.IGNORECASE)
DECLARATION_LOOKAHEAD = 1 << 16  # the declaration sits in a book's first few dozen lines
# Names Project Gutenberg headers use that Python's codec registry does not know as written.
_DECLARED_ALIASES = {"iso latin-1": "latin-1", "iso-latin-1": "latin-1", "unicode utf-8": "utf-8", "unicode": "utf-8",
                     "utf8": "utf-8", "mac roman": "mac-roman", "macroman": "mac-roman"}


def declared_encoding(path: Path) -> tuple[str | None, str | None]:
    """``(what the header declares, the Python codec to read it with)`` from a Project Gutenberg
    ``Character set encoding: ...`` line near the top of ``path``; ``(None, None)`` without one.
    An unknown name gives ``(name, None)``. A declared ASCII is read as UTF-8, its superset: such
    books often carry a few stray non-ASCII bytes, which the per-line fallback then catches."""
    with open(path, "rb") as f:
        head = f.read(DECLARATION_LOOKAHEAD)
    m = DECLARED_RE.search(head)
    if m is None:
        return None, None
    declared = m.group(1).decode("ascii", "replace").strip()
    name = _DECLARED_ALIASES.get(declared.lower(), declared)
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return declared, None
    return declared, "utf-8" if codec in ("ascii", "utf-8") else codec
