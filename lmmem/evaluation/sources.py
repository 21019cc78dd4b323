"""What ``evaluate.py MODEL --data DATA`` names, loaded: the model (an lmmem checkpoint, run folder or
export folder, or a Hugging Face causal-LM folder) and the text it is scored on.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation.adapters import Adapter, LmmemAdapter
from lmmem.evaluation.buckets import FrequencyBuckets
from lmmem.evaluation.data import CorpusData, TokenizedText
from lmmem.evaluation.hf_adapter import HFAdapter
from lmmem.checkpoints import check_vocab_matches, data_dir_for, load_checkpoint, model_from_checkpoint
from lmmem.device import resolve_device

__all__ = ["LoadedModel", "adapter_for", "load_model", "open_data", "resolve_device"]


def adapter_for(model, tokenizer=None) -> Adapter:
    """The adapter of a model object: an :class:`Adapter` as is, an lmmem model, or a Hugging Face
    ``PreTrainedModel`` (with its tokenizer)."""
    if isinstance(model, Adapter):
        return model
    if hasattr(model, "hidden_states") and hasattr(model, "output"):
        return LmmemAdapter(model)
    if hasattr(model, "get_output_embeddings"):
        return HFAdapter(model, tokenizer)
    raise LmmemError(f"cannot evaluate a {type(model).__name__}: give an lmmem model (hidden_states + output layer) or a "
                     "Hugging Face causal LM (get_output_embeddings)")


@dataclass
class LoadedModel:
    adapter: Adapter
    name: str  # how tables and charts name it: the path given, or the model's class
    info: dict = field(default_factory=dict)  # checkpoint, step, model config ...
    tokenizer: object = None
    checkpoint: dict | None = None  # an lmmem checkpoint (its corpus, vocabulary, training bptt)
    path: str | None = None


def is_hf_folder(path: Path) -> bool:
    """A folder written by ``save_pretrained``: a ``config.json`` with a ``model_type``."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False


def load_model(model, *, tokenizer=None, device: str = "auto") -> LoadedModel:
    """A model object (lmmem or Hugging Face, with ``tokenizer``) as is, or a path: an lmmem
    checkpoint / run folder / export folder, or a Hugging Face folder (weights, config, tokenizer;
    lmmem heads saved with it are re-applied by lmmem.hf.from_pretrained)."""
    if not isinstance(model, (str, Path)):
        adapter = adapter_for(model, tokenizer)
        return LoadedModel(adapter, type(model).__name__, adapter.describe(), tokenizer)
    path = Path(model)
    dev = resolve_device(device)
    if is_hf_folder(path):
        return _load_hf(path, dev, tokenizer)
    ckpt = load_checkpoint(path, map_location=dev)
    net = model_from_checkpoint(ckpt, dev)
    info = {"checkpoint": str(path), "step": ckpt["progress"]["step"], "model": ckpt["model_config"]}
    return LoadedModel(LmmemAdapter(net), str(path), info, checkpoint=ckpt, path=str(path))


def _load_hf(path: Path, device: torch.device, tokenizer=None) -> LoadedModel:
    try:
        from transformers import AutoTokenizer

        from lmmem.hf import from_pretrained
    except ImportError:  # pragma: no cover - depends on the environment
        raise LmmemError("evaluating a Hugging Face model needs the optional extra: pip install 'lmmem[hf]'") from None
    try:
        with _quiet_loading():
            net = from_pretrained(str(path)).to(device).eval()
    except (OSError, ValueError) as e:
        raise LmmemError(f"cannot load {path} as a Hugging Face causal LM ({str(e).splitlines()[0][:160]}); give a folder "
                         "written by save_pretrained (config.json, weights)") from None
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError):
            tokenizer = None  # refused later, where text has to be encoded, with the fix
    adapter = adapter_for(net, tokenizer)
    return LoadedModel(adapter, str(path), {"model_path": str(path), **adapter.describe()}, tokenizer, path=str(path))


@contextmanager
def _quiet_loading():
    """No "Loading weights" bar from transformers: the evaluation's own output stays readable, and a
    refusal right after loading stays one line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def open_data(loaded: LoadedModel, data, buckets: FrequencyBuckets, *, text_column: str = "text", hub_config=None):
    """The text source of an evaluation: ``CorpusData`` for an lmmem model (the corpus it was
    trained on by default; its vocabulary checked), ``TokenizedText`` for a model with a tokenizer
    (a prepared corpus folder or a text source: file, folder by split, ``hub:NAME``)."""
    if isinstance(loaded.adapter, LmmemAdapter):
        if isinstance(data, PreparedCorpus):
            corpus = data
        elif loaded.checkpoint is not None:
            data_dir = data_dir_for(loaded.checkpoint, data, loaded.path)
            corpus = PreparedCorpus.open(data_dir)
            check_vocab_matches(loaded.checkpoint, corpus.fingerprint, data_dir, loaded.path)
        elif data is None:
            raise LmmemError("give data=... (the prepared corpus folder the model was trained on)")
        else:
            corpus = PreparedCorpus.open(data)
        if len(corpus.vocab) != loaded.adapter.vocab_size:
            raise LmmemError(f"the model has {loaded.adapter.vocab_size:,} output classes but {corpus.root} has "
                             f"{len(corpus.vocab):,} vocabulary entries: give the corpus the model was trained on")
        return CorpusData(corpus, buckets)
    if data is None:
        raise LmmemError("--data is needed for this model: a prepared corpus folder, a .txt/.jsonl/.parquet file, a folder "
                         "of them named by split, or hub:NAME")
    if isinstance(data, PreparedCorpus):
        source = data
    elif not str(data).startswith("hub:") and (Path(data) / "meta.json").is_file():
        source = PreparedCorpus.open(data)
    else:
        source = str(data)
    return TokenizedText(source, loaded.tokenizer, buckets, text_column=text_column, hub_config=hub_config)


def training_bptt(loaded: LoadedModel) -> int | None:
    """The bptt an lmmem model was trained with (its evaluation default)."""
    if loaded.checkpoint is not None:
        return int(loaded.checkpoint["train_config"]["bptt"])
    return None
