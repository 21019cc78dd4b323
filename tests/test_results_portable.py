"""Committed results and docs hold no path of the machine that ran them, and the helper the runners
use to write paths (lmmem.experiments.paths) maps them as documented."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lmmem.experiments.paths import portable_command, portable_path, portable_shell, project_root

ROOT = Path(__file__).resolve().parents[1]
# /work/..., /tmp/..., /home/..., /Users/..., /root/...: absolute paths of some machine
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|tmp|home|Users|root|scratch|mnt)/[\w.-]")


def committed_docs() -> list[Path]:
    return sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*")] if p.suffix in (".md", ".json") and p.is_file())


def test_committed_results_and_docs_hold_no_machine_paths():
    found = []
    for path in committed_docs():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not found, "absolute paths (store them relative to the project, or WORK/DATA; lmmem.experiments.paths):\n" + "\n".join(found)


def test_portable_path_and_command(tmp_path):
    root = project_root()
    assert (root / "pyproject.toml").is_file()
    assert portable_path(root / "docs" / "results" / "x.json") == "docs/results/x.json"
    assert portable_path(root.parent / "shared" / "data" / "gutenberg") == "../shared/data/gutenberg"
    assert portable_path(tmp_path / "corpus") == "corpus" and portable_path(tmp_path / "c", "DATA") == "DATA"
    assert portable_path(tmp_path / "w" / "run" / "best.pt", anchors={tmp_path / "w": "WORK"}) == "WORK/run/best.pt"
    argv = ["gutenberg", "--work", str(tmp_path / "w"), "--data=" + str(tmp_path / "d"), "--page", str(root / "docs" / "p.md"),
            "--reuse", f"full={tmp_path / 'r.json'}", "--prep-args", f"--vocab-from {tmp_path / 'v'} --min-count 2",
            "--source", "../shared/data/news-abc", "--seeds", "1", "2"]
    cmd = portable_command(argv, "python -m x", {tmp_path / "w": "WORK"})
    assert cmd == ("python -m x gutenberg --work WORK --data=DATA --page docs/p.md --reuse full=REUSE "
                   "--prep-args '--vocab-from VOCAB_FROM --min-count 2' --source ../shared/data/news-abc --seeds 1 2")
    assert str(tmp_path) not in cmd and shlex.split(cmd)[3] == "gutenberg"
    shell = f"/some/venv/bin/python -m lmmem.experiments.dynamic_sweep {tmp_path / 'run' / 'best.pt'} --json {tmp_path / 'o.json'}"
    assert portable_shell(shell) == "python -m lmmem.experiments.dynamic_sweep PATH --json JSON"
    assert portable_shell(f"python train.py --data {tmp_path}/w/data", {tmp_path / "w": "WORK"}) == "python train.py --data WORK/data"


@pytest.mark.parametrize("module", ["softmax_comparison", "hf_head_comparison", "dynamic_sweep", "mbpa_sweep", "name_recall",
                                    "curriculum", "new_tokens"])
def test_runner_help_description_is_whole(module, capsys):
    """--help shows the runner's first docstring paragraph whole (it was cut after its first line)."""
    import importlib

    mod = importlib.import_module(f"lmmem.experiments.{module}")
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    first = " ".join(mod.__doc__.strip().split("\n\n")[0].split())
    for markup in (":func:", ":class:", ":mod:", "``", "`"):
        first = first.replace(markup, "")
    if module != "new_tokens":  # (its description is its own sentence)
        assert first in text, first
    assert "``" not in text
