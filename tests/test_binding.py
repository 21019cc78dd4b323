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
        # held out: the same types in every branch; the inert branch equals the full one there too
        assert inert["held_out"] == full["held_out"] and inert["held_out_delta"]["1"][0] == 0.0
        assert sum(full["held_out"][k][3] for k in binding.K_NAMES) > 0
    text = page.read_text()
    assert "k=3–4" in text and "python -m lmmem.experiments.binding" in text and "sighted 3–4" in text
    # resumable: finished branches are read back, the trunk is not retrained
    for f in (work / "trunk").glob("step*.pt"):
        f.unlink()
    assert binding.main(argv) == 0
    assert not list((work / "trunk").glob("step*.pt"))


def test_binding_held_out_endpoint(small_corpus, tmp_path):
    """The valid NLL of each rare word at the branch end, with its sightings in the branch: the
    per-type numbers are those of the model scored on valid for that word alone, the sightings are
    the recorder's, and a branch finished before the endpoint existed gets the same numbers from its
    saved last.pt and the stream."""
    from lmmem.checkpoints import load_checkpoint, model_from_checkpoint
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.evaluation import score_stream

    work = tmp_path / "work"
    argv = ["--data", str(small_corpus), "--work", str(work), "--train-args", TINY, "--branch-points", "6",
            "--branch-steps", "9", "--settle", "2", "--rare-below", "40", "--frequent-from", "300", "--bootstrap", "50",
            "--variants", "full", "centred:softmax=hebbian,hebbian_start_step=0"]
    assert binding.main(argv) == 0
    path = work / "branch-step6-centred.json"
    live = json.loads(path.read_text())
    h = live["held_out"]
    corpus = PreparedCorpus.open(small_corpus)
    counts = corpus.train_counts()
    assert all(counts[t] < 40 for t in h["types"]) and min(h["counts"]) > 0
    assert max(h["branch_sightings"]) > 0 and min(h["branch_sightings"]) == 0  # both kinds present at this size
    model = model_from_checkpoint(load_checkpoint(work / "branch-step6-centred" / "last.pt"))
    valid = corpus.tokens("valid")
    for i in (0, len(h["types"]) // 2, len(h["types"]) - 1):
        only = (np.arange(len(counts)) == h["types"][i]).astype(np.int64)  # bucket 1 = this word, 0 = the rest
        nll, cnt = score_stream(model, valid, bucket_of=only, num_buckets=2, batch_size=16, bptt=10)
        assert cnt.reshape(-1)[1] == h["counts"][i]
        assert np.isclose(nll.reshape(-1)[1] / cnt.reshape(-1)[1], h["mean_nll"][i], rtol=1e-9)
    # the same endpoint, from the saved branch and the stream (a JSON from before it existed)
    del live["held_out"]
    path.write_text(json.dumps(live))
    assert binding.main(argv) == 0
    again = json.loads(path.read_text())["held_out"]
    assert again["types"] == h["types"] and again["branch_sightings"] == h["branch_sightings"]
    assert again["counts"] == h["counts"] and np.allclose(again["mean_nll"], h["mean_nll"], rtol=1e-12)


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
