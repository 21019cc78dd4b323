"""README's "Commands" block runs as written, in a fresh folder, with small-size flags appended
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


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert START in text and END in text, "README.md lost its commands block markers"
    block = text.split(START, 1)[1].split(END, 1)[0].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, small_corpus):
    commands = readme_commands()
    assert len(commands) >= 4
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
    assert (tmp_path / "runs/again/words.tsv").is_file()
