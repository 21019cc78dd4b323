"""lmmem.progress: plain lines with position, total, elapsed and time left where no terminal is attached."""

import io
import re

from lmmem.progress import Progress, format_duration


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(59.6) == "1m00s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3720) == "1h02m"


def test_plain_lines_to_a_file_name_total_and_time_left():
    out = io.StringIO()
    with Progress(20, "train", unit="step", stream=out, every_s=1e9) as p:
        for i in range(20):
            p.set_postfix(loss=5.0 - i * 0.1)
            p.update()
    lines = out.getvalue().splitlines()
    # one line per tenth, plus the final one
    assert len(lines) == 11, lines
    assert re.match(r"train: 2/20 steps \(10%\), \d+s elapsed, ~\d+s left, loss 4.9", lines[0]), lines[0]
    assert lines[-1].startswith("train: 20/20 steps (100%)") and "done" in lines[-1]


def test_time_left_counts_only_this_process():
    p = Progress(100, "train", initial=90, stream=io.StringIO(), every_s=1e9)
    p._t0 -= 10.0  # 10 s for the 5 steps below: 2 s a step
    p.update(5)
    assert abs(p.eta() - 10.0) < 0.5  # 5 steps left at 2 s each, not the 90 before the resume


def test_disabled_prints_nothing_and_terminal_gets_a_bar():
    out = io.StringIO()
    with Progress(5, "valid", stream=out, enabled=False) as p:
        p.update(5)
    assert out.getvalue() == ""
    tty = FakeTTY()
    with Progress(5, "valid", stream=tty) as p:
        p.update(5)
    assert "valid" in tty.getvalue() and "elapsed" not in tty.getvalue()  # tqdm's bar, not plain lines


def test_unknown_total_has_no_time_left():
    out = io.StringIO()
    with Progress(None, "build", unit="chunk", stream=out, every_s=0.0) as p:
        p.update(3)
    assert "3 chunks" in out.getvalue() and "left" not in out.getvalue()
