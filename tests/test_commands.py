"""The commands users type (issue 15 items 1–4): the default run folder, `lmmem ...` and
`python -m lmmem ...`, --config files, --tensorboard, the LICENSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmmem.config_file import argv_with_config, read_config_file
from lmmem.errors import LmmemError
from lmmem.training import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "12", "--embed-dim", "16", "--hidden-dim", "24", "--proj-dim", "16", "--batch-size", "4", "--bptt", "8",
        "--eval-interval", "0", "--eval-batch-size", "4", "--log-interval", "6", "--checkpoint-interval", "6", "--no-progress"]


def run_in(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command with ``cwd`` as the user's folder and this checkout on the path."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# --config files (in-process: cheap)


def _train_args(tmp_path, argv):
    parser = build_parser()
    from lmmem.config_file import add_config_argument

    add_config_argument(parser)
    args = parser.parse_args(argv_with_config(argv, parser, "train"))
    return config_from_args({k: v for k, v in vars(args).items() if k != "config"})


def test_config_file_json_and_toml_with_command_line_overrides(tmp_path):
    pytest.importorskip("tomllib")
    (tmp_path / "a.json").write_text(json.dumps({"lr": 0.01, "batch-size": 8, "tie_weights": False, "softmax": "hebbian"}))
    (tmp_path / "a.toml").write_text('[train]\nlr = 0.01\nbatch_size = 8\ntie_weights = false\nsoftmax = "hebbian"\n'
                                     '[evaluate]\nsplit = "valid"\n')
    for name in ("a.json", "a.toml"):
        cfg = _train_args(tmp_path, ["--config", str(tmp_path / name), "--batch-size", "2"])
        assert (cfg.lr, cfg.batch_size, cfg.tie_weights, cfg.softmax) == (0.01, 2, False, "hebbian")  # the flag wins
    cfg = _train_args(tmp_path, ["--tie-weights", "--config", str(tmp_path / "a.toml")])
    assert cfg.tie_weights is True  # order on the command line does not matter: flags always win


def test_config_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": "must hold a mapping",
        '{"no_such_option": 1}': "unknown option 'no_such_option'",
        '{"evaluate": {"split": "valid"}}': "has no [train] section",
        '{"compile": "yes"}': "is a switch",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(LmmemError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _train_args(tmp_path, ["--config", str(bad)])
    with pytest.raises(LmmemError, match="cannot read"):
        _train_args(tmp_path, ["--config", str(tmp_path / "missing.toml")])


def test_a_runs_config_json_drops_its_own_folder(tmp_path):
    run_config = {"train": {"out": "runs/old", "resume": True, "lr": 0.02, "data": None}, "model": {"arch": "lstm"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(run_config))
    assert read_config_file(path, "train") == {"lr": 0.02, "data": None}


def test_pyproject_declares_the_console_script_and_a_licence_file_that_matches():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["lmmem"] == "lmmem.__main__:main"
    from lmmem.__main__ import main  # noqa: F401  (the entry point imports)

    assert meta["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, small_corpus):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    from lmmem.training import train

    cfg = _train_args(tmp_path, ["--data", str(small_corpus), "--out", str(tmp_path / "r"), "--tensorboard", *TINY])
    with pytest.raises(LmmemError, match="needs the tensorboard package: pip install tensorboard"):
        train(cfg)
    assert not (tmp_path / "r").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------
# the real commands (subprocesses)


@pytest.mark.slow
def test_default_run_folder_round_trip(tmp_path, small_corpus):
    """`python evaluate.py` with no checkpoint: an error naming `python train.py` when there is no
    run; after `python train.py`, the default run's best checkpoint, said so."""
    missing = run_in(tmp_path, str(REPO / "evaluate.py"), "--mbpa")
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.count("\n") == 1 and "`python train.py`" in missing.stderr and "runs/default" in missing.stderr

    trained = run_in(tmp_path, str(REPO / "train.py"), "--data", str(small_corpus), *TINY)
    assert trained.returncode == 0, trained.stderr
    assert "run folder:      runs/default" in trained.stdout
    assert "best checkpoint: runs/default/best.pt (step 12, valid ppl" in trained.stdout
    assert "next:            python evaluate.py    #" in trained.stdout

    ev = run_in(tmp_path, str(REPO / "evaluate.py"), "--max-tokens", "200", "--json", "e.json")
    assert ev.returncode == 0, ev.stderr
    assert "no checkpoint given: evaluating runs/default/best.pt" in ev.stdout
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == "runs/default/best.pt"


@pytest.mark.slow
def test_python_m_lmmem_runs_the_three_commands_and_config_json_trains_the_same_run(tmp_path):
    corpus = tmp_path / "syn"
    prep = run_in(tmp_path, "-m", "lmmem", "prepare", "synthetic", "--out", str(corpus), "--train-tokens", "6000",
                  "--valid-tokens", "1500", "--test-tokens", "1500", "--quiet")
    assert prep.returncode == 0, prep.stderr
    a = run_in(tmp_path, "-m", "lmmem", "train", "--data", str(corpus), "--out", "runs/a", "--tensorboard", *TINY)
    assert a.returncode == 0, a.stderr
    assert "next:            lmmem evaluate runs/a/best.pt" in a.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs/a/tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (tmp_path / "runs/a/metrics.jsonl").read_text().splitlines()]
    for name in ("train_loss", "lr", "val_ppl"):  # the same numbers as metrics.jsonl, at the same steps
        logged = [(m["step"], m[name]) for m in metrics if name in m]
        assert logged and [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(name)] == logged
    # the run's own config.json trains the same configuration again, in another folder
    b = run_in(tmp_path, "-m", "lmmem", "train", "--config", "runs/a/config.json", "--out", "runs/b", "--max-steps", "6")
    assert b.returncode == 0, b.stderr
    ca = json.loads((tmp_path / "runs/a/config.json").read_text())
    cb = json.loads((tmp_path / "runs/b/config.json").read_text())
    assert cb["model"] == ca["model"]
    assert {k: v for k, v in cb["train"].items() if k not in ("out", "max_steps")} == \
           {k: v for k, v in ca["train"].items() if k not in ("out", "max_steps")}
    assert cb["train"]["max_steps"] == 6 and cb["train"]["out"] == str(tmp_path / "runs/b")  # recorded absolute
    (tmp_path / "ev.toml").write_text('[evaluate]\nsplit = "valid"\nmax_tokens = 300\n')
    ev = run_in(tmp_path, "-m", "lmmem", "evaluate", "runs/b/best.pt", "--config", "ev.toml")
    assert ev.returncode == 0, ev.stderr
    assert "[valid], 300 tokens" in ev.stdout
    usage = run_in(tmp_path, "-m", "lmmem")
    assert usage.returncode == 2 and "lmmem {train,evaluate,datastore,prepare}" in usage.stderr


def test_prepare_reads_its_options_from_a_config_file(tmp_path, capsys):
    from data_prep.__main__ import main as prepare

    (tmp_path / "p.json").write_text(json.dumps({"prepare": {"out": str(tmp_path / "c"), "train_tokens": 3000, "valid_tokens": 600,
                                                             "test_tokens": 600, "quiet": True}}))
    assert prepare(["synthetic", "--config", str(tmp_path / "p.json"), "--seed", "3"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert 2500 < meta["splits"]["train"]["tokens"] < 3500
    (tmp_path / "bad.json").write_text(json.dumps({"no_such": 1}))
    assert prepare(["synthetic", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "d")]) == 2
    assert "unknown option 'no_such'" in capsys.readouterr().err
