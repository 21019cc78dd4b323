"""Progress of long work (training, validation, evaluation, datastore builds), readable anywhere.

On a terminal: a ``tqdm`` bar. Anywhere else (output redirected to a file, CI logs, ``nohup``):
plain lines on stderr, flushed at once, each with the position, the total, the elapsed time and the
time left, e.g. ``train: 400/2000 steps (20%), 1m12s elapsed, ~4m48s left, loss 5.21``. A redirected
run is the one nobody watches, so it must still say how far it is and how long the rest will take.

A plain line is printed when ``every_s`` seconds have passed since the last one, and at every
further tenth of the total (so a short job still says something), and once at the end. The time
left is the elapsed time per unit done *in this process* times the units left (a resumed run's
earlier steps do not make it look faster than it is).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short, and never a float with many digits."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """``update(n)``, ``set_postfix(**values)``, ``write(line)``, ``close()``; a context manager.

    Args:
        total: units of the whole job (steps, batches, tokens); ``None`` when unknown (no time left).
        desc: what the job is (``train``, ``valid``, ``test +cache``), the start of every line.
        unit: the unit's name in plain lines (``step``, ``batch``).
        initial: units already done before this process (a resumed run).
        enabled: ``False``: print nothing at all (a worker rank, ``--no-progress``).
        stream: where to write (default ``sys.stderr``); its ``isatty()`` picks bar or lines.
        every_s: seconds between plain lines (at least; tenths of the total add lines).
        bar: force the bar (``True``) or the plain lines (``False``); default: the stream decides.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream=None, every_s: float = 30.0, bar: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.postfix: dict[str, str] = {}
        self._t0 = self._last_line = time.monotonic()
        self._next_tenth = self._tenth_after(initial)
        self._closed = False
        use_bar = enabled and (bar if bar is not None else _isatty(self.stream))
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                         leave=False) if use_bar else None

    # -- the interface -----------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or (self._next_tenth is not None and self.n >= self._next_tenth):
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def write(self, line: str) -> None:
        """A message that does not break the bar (``tqdm.write``), flushed at once."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self._start_n:
            self._line(time.monotonic(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plain lines ----------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def eta(self) -> float | None:
        """Seconds left at this process's rate so far (None: unknown total or nothing done yet)."""
        done = self.n - self._start_n
        if self.total is None or done <= 0:
            return None
        return self.elapsed / done * max(self.total - self.n, 0)

    def line(self, final: bool = False) -> str:
        units = f"{self.unit}s" if not self.unit.endswith("s") else self.unit
        if self.total:
            where = f"{self.n:,}/{self.total:,} {units} ({100 * self.n / self.total:.0f}%)"
        else:
            where = f"{self.n:,} {units}"
        parts = [f"{self.desc}: {where}", f"{format_duration(self.elapsed)} elapsed"]
        left = self.eta()
        if final:
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif left is not None:
            parts.append(f"~{format_duration(left)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _line(self, now: float, final: bool = False) -> None:
        print(self.line(final), file=self.stream, flush=True)
        self._last_line = now
        self._next_tenth = self._tenth_after(self.n)

    def _tenth_after(self, n: int) -> int | None:
        if not self.total:
            return None
        step = max(1, self.total // 10)
        return (n // step + 1) * step


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or fake stream
        return False
