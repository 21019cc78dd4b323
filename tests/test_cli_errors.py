"""Every argparse error is one line naming the fix, and abbreviated flags are refused."""

import subprocess
import sys

import pytest

from lmmem.cli import ArgumentParser


def parser():
    p = ArgumentParser(prog="train.py")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--preset", choices=["tiny", "small", "wt103-paper"])
    p.add_argument("--lr", type=float)
    return p


@pytest.mark.parametrize("argv, expected", [
    (["--max-stepz", "5"], "unknown option --max-stepz: did you mean --max-steps?"),
    (["--max-step", "5"], "unknown option --max-step: did you mean --max-steps?"),  # no abbreviations
    (["--preset", "tinyy"], "--preset 'tinyy' is not one of its choices: tiny, small, wt103-paper (did you mean tiny?)"),
    (["--max-steps", "five"], "--max-steps takes an integer, not 'five'"),
    (["--lr", "x"], "--lr takes a number, not 'x'"),
    (["--lr"], "--lr needs a value"),
])
def test_one_line_with_the_fix(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--preset", "tinyy"], ["--max-stepz", "5"], ["--max-step", "5"]])
def test_train_py_errors_are_one_line(argv, tmp_path):
    r = subprocess.run([sys.executable, "train.py", *argv, "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_toml_config_type_error_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_steps = "five"\n')
    r = subprocess.run([sys.executable, "train.py", "--config", str(cfg), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--max-steps takes an integer" in r.stderr


def test_dataclass_arguments_follow_the_fields():
    from dataclasses import dataclass, field

    from lmmem.cli import add_dataclass_arguments, dataclass_from_args
    from lmmem.errors import LmmemError

    @dataclass
    class Cfg:
        window: int = field(default=2000, metadata={"help": "pairs kept"})
        rule: str = field(default="a", metadata={"help": "the rule", "choices": ("a", "b")})
        segment: int | None = field(default=None, metadata={"help": "length"})
        exact: bool = field(default=True, metadata={"help": "exact distances"})
        hidden: int = field(default=1, metadata={"cli": False})

        def __post_init__(self):
            if self.window < 1:
                raise ValueError("window must be ≥ 1")

    p = ArgumentParser(prog="x")
    dests = add_dataclass_arguments(p, Cfg, prefix="cache-")
    assert set(dests) == {"cache_window", "cache_rule", "cache_segment", "cache_exact"}
    assert "{a,b}" in p.format_usage() and "(default: 2000)" in p.format_help()
    cfg = dataclass_from_args(Cfg, p.parse_args(["--cache-window", "7", "--no-cache-exact"]), dests)
    assert cfg == Cfg(window=7, exact=False)
    assert dataclass_from_args(Cfg, p.parse_args([]), dests) == Cfg()
    with pytest.raises(LmmemError, match="window must be"):
        dataclass_from_args(Cfg, p.parse_args(["--cache-window", "0"]), dests)
