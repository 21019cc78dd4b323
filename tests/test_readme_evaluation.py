"""The README's evaluation commands (any causal LM, kNN-LM) run as written (small-size flags
appended), on a tiny lmmem run and a tiny Hugging Face GPT-2 over the same prepared corpus."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_prepared_corpus

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- evaluation-commands:start -->", "<!-- evaluation-commands:end -->"
SMALL = {"evaluate.py": ["--max-tokens", "200", "--batch-size", "4"], "datastore": ["--max-tokens", "1500", "--batch-size", "4"]}


def commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split(START, 1)[1].split(END, 1)[0].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_docs_page_has_the_same_commands():
    page = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for words in commands():
        assert shlex.join(words) in page


@pytest.mark.slow
def test_readme_evaluation_commands_run_as_written(tmp_path):
    pytest.importorskip("lmmem.memories.knn")
    from hf_helpers import tiny_model, train_tokenizer
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.training import config_from_args, train

    data = write_prepared_corpus(tmp_path / "data" / "gutenberg")
    train(config_from_args({"data": str(data), "out": str(tmp_path / "runs" / "gut"), "preset": "tiny", "max_steps": 10,
                            "batch_size": 4, "bptt": 16, "embed_dim": 16, "hidden_dim": 24, "proj_dim": 16,
                            "tie_weights": True, "eval_interval": 0, "progress": False}))
    units = tmp_path / "units.txt"
    units.write_text("".join(u + "\n" for u in PreparedCorpus.open(data).text_units("train")))
    tok = train_tokenizer([units], vocab_size=300)
    tiny_model("gpt2", len(tok), positions=256).save_pretrained(tmp_path / "hf" / "gpt2-gut")
    tok.save_pretrained(tmp_path / "hf" / "gpt2-gut")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for words in commands():
        args = [sys.executable, str(REPO / words[1]), *words[2:]] if words[0] == "python" else [sys.executable, "-m", *words]
        args += SMALL["datastore" if words[:2] == ["lmmem", "datastore"] else "evaluate.py"]
        if "--knn" in words:
            args += ["--knn-k", "16"]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stdout}\n{proc.stderr}"
    out = json.loads((tmp_path / "e.json").read_text())
    assert set(out["methods"]) == {"plain", "+cache", "+knn", "+cache+knn"} and out["window"]["convention"] == "sliding"
    assert json.loads((tmp_path / "eval.json").read_text())["tuned"]["choice"]["+dynamic"]["lr"] > 0
