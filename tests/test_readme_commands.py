"""The command blocks of the README and the guides (docs/*.md, between ``<!-- commands:start -->``
and ``<!-- commands:end -->``) run as written, each in a fresh folder, with small-size flags appended
(a tiny model for a few steps on a small corpus, a few hundred evaluated tokens)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- commands:start -->", "<!-- commands:end -->"
SMALL_TRAIN = ["--max-steps", "12", "--embed-dim", "16", "--hidden-dim", "24", "--proj-dim", "16", "--batch-size", "4",
               "--bptt", "8", "--eval-interval", "0", "--eval-batch-size", "4", "--no-progress"]
SMALL_EVAL = ["--max-tokens", "300", "--batch-size", "4"]


def command_blocks() -> dict[str, list[list[str]]]:
    """``{document: commands}`` for every marked block in README.md and docs/**/*.md."""
    blocks = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for i, part in enumerate(text.split(START)[1:]):
            assert END in part, f"{path}: a commands block without its end marker"
            block = part.split(END, 1)[0].split("```bash\n", 1)[1].split("```", 1)[0]
            blocks[f"{path.relative_to(REPO)}#{i}"] = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    return blocks


def blocks_to_run() -> dict[str, list[list[str]]]:
    """Every block, except one that is the start of a longer block (running the longer one runs it)."""
    blocks = command_blocks()
    longest_first = sorted(blocks.items(), key=lambda kv: -len(kv[1]))
    kept: dict[str, list[list[str]]] = {}
    for name, commands in longest_first:
        if not any(other[: len(commands)] == commands for other in kept.values()):
            kept[name] = commands
    return kept


def test_the_readme_has_a_command_block_and_the_guides_keep_the_full_one():
    blocks = command_blocks()
    assert any(name.startswith("README.md") for name in blocks)
    assert sum(len(c) for c in blocks_to_run().values()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(blocks_to_run()))
def test_documented_commands_run_as_written(tmp_path, small_corpus, name):
    commands = blocks_to_run()[name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    for words in commands:
        assert words[0] == "python"
        args = [sys.executable, *words[1:]]
        if words[1] in ("train.py", "evaluate.py"):
            args[1] = str(REPO / words[1])
        is_train = "train.py" in words or "train" in words[3:4]
        if is_train and "--config" not in words:
            args += ["--data", str(small_corpus)]
        args += SMALL_TRAIN if is_train else SMALL_EVAL
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stdout}\n{proc.stderr}"
    if any("--word-probs" in words for words in commands):
        assert (tmp_path / "runs/again/words.tsv").is_file()
