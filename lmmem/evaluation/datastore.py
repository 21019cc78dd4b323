"""Build a kNN-LM datastore: ``lmmem datastore MODEL --data SOURCE --split train --out DS``.

The model reads the split the way the evaluation reads text (the same window conventions and
adapters: an lmmem checkpoint on its prepared corpus, a Hugging Face model on a prepared corpus or
a text source through its tokenizer); every scored target gives one (key, value) pair: the hidden
state the output layer read (the key the evaluation will query with) and the target token. The
pairs go to :class:`lmmem.memories.knn.DatastoreWriter`, which stages the folder, commits in chunks
and swaps it in complete, with a manifest naming the model and tokenizer fingerprints, the key
source and how it was built. A build stopped at any moment (Ctrl-C, kill -9, a full disk) resumes
where its last commit ended when the same command runs again; the rows already written are skipped
(for a model with a carried state, an LSTM, they are read again without being written).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

import torch

from lmmem.cli import ArgumentParser, HelpFormatter, add_dataclass_arguments, dataclass_from_args, run_cli
from lmmem.errors import LmmemError
from lmmem.evaluation.config import EvalConfig
from lmmem.evaluation.knn import identity
from lmmem.evaluation.run import Evaluation
from lmmem.evaluation.windows import total_steps
from lmmem.memories.knn_index import CALIBRATION_KS
from lmmem.output_layers.base import IGNORE_INDEX
from lmmem.validation import check_flags

INDEX_KINDS = ("auto", "flat", "ivfpq")


@dataclass
class DatastoreConfig:
    out: str | None = field(default=None, metadata={"help": "the datastore folder to write (staged beside it, swapped in complete)"})
    index: str = field(default="auto", metadata={
        "help": "flat (exact search), ivfpq (FAISS inverted lists of product-quantised codes) or auto (flat up to a size)",
        "choices": INDEX_KINDS})
    overwrite: bool = field(default=False, metadata={"help": "replace a complete datastore already at --out"})
    resume: bool = field(default=True, metadata={"help": "continue an interrupted build of the same command (--no-resume: start over)"})
    recall_k: str = field(default=",".join(map(str, CALIBRATION_KS)), metadata={
        "help": "the k values an IVFPQ index is calibrated for (the nprobe that finds 90%% of the exact neighbours at each): "
                "include the largest --knn-k you will evaluate with"})

    def __post_init__(self):
        recall_ks(self.recall_k)  # a bad list fails here, before any model loads


def recall_ks(text: str) -> tuple[int, ...]:
    """``--recall-k``: positive whole numbers separated by commas."""
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise LmmemError(f"--recall-k takes positive whole numbers separated by commas (e.g. 8,64,1024,2048), got {text!r}")
    return tuple(ks)


@dataclass
class DatastoreTextConfig(EvalConfig):
    """What the datastore is built from: the evaluation's text settings, the train split by default."""

    split: str = field(default="train", metadata={"help": "the split whose (hidden state, next token) pairs are stored",
                                                   "choices": EvalConfig.__dataclass_fields__["split"].metadata["choices"]})


def build_datastore(ev: Evaluation, cfg: DatastoreConfig, *, command: str | None = None):
    """Walk ``ev``'s split with its model and write every scored (hidden state, target) pair."""
    from lmmem.memories.knn import DatastoreWriter

    data, adapter = ev.data, ev.adapter
    if adapter.hidden_problem():
        raise LmmemError(adapter.hidden_problem())
    groups = ev.windows(data).groups()
    rows = len(data.tokens) - (0 if ev.window == "lm-eval" else 1)
    info = {**identity(adapter, ev.loaded.tokenizer, ev.source.describe().get("vocab_fingerprint")),
            "model": ev.loaded.name, **ev.source.describe(), "split": ev.config.split, "window": ev.windows(data).describe(),
            "tokens": rows, "max_tokens": ev.config.max_tokens, "command": command}
    writer = DatastoreWriter(cfg.out, dim=adapter.dim, info=info, expected_rows=rows, resume=cfg.resume,
                             overwrite=cfg.overwrite, progress=ev.progress)
    try:
        if writer.rows_done:
            ev.log(f"resuming the datastore build: {writer.rows_done:,} of {rows:,} rows already written")
        _walk(adapter, groups, writer, skip=writer.rows_done)
        return writer.finish(cfg.index, info={"batches": total_steps(groups)}, recall_ks=recall_ks(cfg.recall_k))
    finally:
        writer.close()


@torch.no_grad()
def _walk(adapter, groups, writer, *, skip: int) -> None:
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        for g in groups:
            state = adapter.init_state(g.rows)
            for step in range(g.steps):
                batch = g.batch(step)
                y = batch.targets.reshape(-1)
                valid = y != IGNORE_INDEX
                n = int(valid.sum())
                if skip >= n and not adapter.carries_state:  # written before the interruption: not even read
                    skip -= n
                    continue
                fwd = adapter.forward(batch.inputs.to(adapter.device), state)
                state = fwd.state
                keys = fwd.hidden.reshape(-1, fwd.hidden.shape[-1])[valid.to(adapter.device)]
                values = y[valid]
                if skip:
                    cut = min(skip, n)
                    keys, values, skip = keys[cut:], values[cut:], skip - cut
                if len(values):
                    writer.append(keys, values)
    finally:
        model.train(was_training)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lmmem datastore", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="lmmem checkpoint, run or export folder, or a Hugging Face causal-LM folder")
    p.add_argument("--data", help="prepared corpus folder (default for lmmem models: their own), or a text source: "
                                  ".txt/.jsonl/.parquet file, folder by split, hub:NAME")
    dests = {"ds": add_dataclass_arguments(p, DatastoreConfig),
             "eval": add_dataclass_arguments(p, DatastoreTextConfig, skip=("tune", "buckets"))}
    p.set_defaults(_dests=dests)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_flags({k: v for k, v in vars(args).items() if not k.startswith("_")})
    cfg = dataclass_from_args(DatastoreConfig, args, args._dests["ds"])
    if not cfg.out:
        raise LmmemError("give --out DS, the datastore folder to write")
    config = dataclass_from_args(DatastoreTextConfig, args, args._dests["eval"])
    ev = Evaluation(args.model, data=args.data, config=config, progress=True)
    print(f"datastore of {ev.header()}", flush=True)
    out = build_datastore(ev, cfg, command=shlex.join(["lmmem", "datastore", *argv]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
