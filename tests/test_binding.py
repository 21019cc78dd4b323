"""The fast-binding experiment (lmmem.experiments.binding) end to end on a tiny corpus: trunk,
branches on identical batches, the k-th-sighting table with intervals, guards, page, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.experiments import binding

TINY = "preset=tiny seed=1 batch_size=4 bptt=10 embed_dim=16 hidden_dim=24 proj_dim=16 warmup_steps=2 dropout=0.1 output_dropout=0.1"


def test_binding_end_to_end(small_corpus, tmp_path):
    work, page = tmp_path / "work", tmp_path / "page.md"
    variants = ["full", "paper:softmax=hebbian,hebbian_rule=paper,hebbian_start_step=0",
                "centred:softmax=hebbian,hebbian_start_step=0",
                # T = 0: the rule never writes, so this branch must equal the full one exactly
                "inert:softmax=hebbian,hebbian_T=0"]
    argv = ["--data", str(small_corpus), "--work", str(work), "--train-args", TINY, "--branch-points", "6", "12",
            "--branch-steps", "10", "--settle", "2", "--rare-below", "40", "--frequent-from", "300", "--bootstrap", "200",
            "--variants", *variants, "--page", str(page)]
    assert binding.main(argv) == 0
    res = json.loads((work / "binding.json").read_text())
    rows = {(r["label"], r["point"]): r for r in res["summary"]}
    assert set(rows) == {(v.split(":")[0], p) for v in variants for p in (6, 12)}
    for p in (6, 12):
        inert, full = rows[("inert", p)], rows[("full", p)]
        for k in binding.K_NAMES:
            assert inert["k"][k][:2] == full["k"][k][:2] or np.isnan(full["k"][k][0])
            if not np.isnan(full["k"][k][0]):
                assert inert["delta_vs_full"][k][0] == 0.0
        assert inert["valid_ppl"] == full["valid_ppl"] and inert["rare_mass"] == full["rare_mass"]
        # the paper's rule writes rows: its branch differs
        assert rows[("paper", p)]["valid_ppl"] != full["valid_ppl"]
        m, lo, hi, n = full["k"]["1"]
        assert n > 0 and lo <= m <= hi
        assert 0 < full["rare_mass"] < 1 and 0 < full["rare_share"] < 1
    text = page.read_text()
    assert "k=3–4" in text and "python -m lmmem.experiments.binding" in text
    # resumable: finished branches are read back, the trunk is not retrained
    for f in (work / "trunk").glob("step*.pt"):
        f.unlink()
    assert binding.main(argv) == 0
    assert not list((work / "trunk").glob("step*.pt"))


def test_binding_needs_a_full_reference(small_corpus, tmp_path):
    with pytest.raises(LmmemError):
        binding.main(["--data", str(small_corpus), "--work", str(tmp_path), "--variants", "paper:softmax=hebbian"])


def test_binding_from_a_hebbian_trunk_against_a_named_reference(small_corpus, tmp_path):
    """--trunk softmax=hebbian: the trunk is trained with the rule (its checkpoints carry the rule's
    counts), and --reference names the branch of the paired differences (here: writes switched off)."""
    work = tmp_path / "work"
    variants = ["writes-off:softmax=hebbian,hebbian_T=0", "default:softmax=hebbian,hebbian_start_step=2", "also-off:softmax=hebbian,hebbian_T=0"]
    argv = ["--data", str(small_corpus), "--work", str(work), "--train-args", TINY, "--branch-points", "8",
            "--branch-steps", "8", "--settle", "2", "--rare-below", "40", "--frequent-from", "300", "--bootstrap", "100",
            "--trunk", "softmax=hebbian hebbian_start_step=2", "--reference", "writes-off", "--variants", *variants,
            "--page", str(tmp_path / "page.md")]
    assert binding.main(argv) == 0
    trunk = torch.load(work / "trunk" / "step8.pt", map_location="cpu", weights_only=False)
    state = trunk["model"]
    assert int(state["output.counts"].sum()) > 0 and int(state["output.updates"]) == 8
    rows = {r["label"]: r for r in json.loads((work / "binding.json").read_text())["summary"]}
    assert rows["writes-off"]["delta_vs_full"] == {}  # the reference itself
    for k in binding.K_NAMES:
        if not np.isnan(rows["writes-off"]["k"][k][0]):
            assert rows["also-off"]["delta_vs_full"][k][0] == 0.0
    assert rows["default"]["valid_ppl"] != rows["writes-off"]["valid_ppl"]
    text = (tmp_path / "page.md").read_text()
    assert "Trunk: `softmax=hebbian,hebbian_start_step=2`" in text and "Paired difference to writes-off" in text
    with pytest.raises(LmmemError):
        binding.main(argv[:-len(variants) - 3] + ["--variants", "default:softmax=hebbian"])
