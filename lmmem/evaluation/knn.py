"""kNN-LM in the evaluation: what a datastore's keys are, checked before it is used.

A datastore (lmmem.memories.knn, written by ``lmmem datastore``) holds the hidden states one
model computed over text one tokenizer encoded. Its manifest records both fingerprints and the key
source; :func:`open_datastore` opens it with those expected, so a datastore built for another
model or tokenizer (or a half-built one, or one whose files were cut short) is refused in one line
naming the fix, before anything is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmmem.evaluation.adapters import Adapter, LmmemAdapter

KEY_SOURCES = {"lmmem": "lmmem output layer input", "hf": "input of get_output_embeddings()"}


@dataclass
class OpenedDatastore:
    datastore: object  # lmmem.memories.knn.Datastore
    config: object  # lmmem.memories.knn.KNNConfig


def key_source(adapter: Adapter) -> str:
    return KEY_SOURCES.get(adapter.kind, f"{adapter.kind} hidden states")


def tokenizer_fingerprint(adapter: Adapter, tokenizer=None, vocab_fingerprint: str | None = None) -> str | None:
    """The fingerprint of what turns text into the model's ids: an lmmem model's vocabulary, or a
    Hugging Face tokenizer's full definition."""
    if isinstance(adapter, LmmemAdapter):
        return vocab_fingerprint
    if tokenizer is None:
        return None
    from lmmem.evaluation.hf_adapter import tokenizer_fingerprint as hf_fingerprint

    return hf_fingerprint(tokenizer)


def identity(adapter: Adapter, tokenizer=None, vocab_fingerprint: str | None = None) -> dict:
    """What a datastore's keys must have been made with to serve this model."""
    return {"model_fingerprint": adapter.fingerprint(), "tokenizer_fingerprint": tokenizer_fingerprint(
        adapter, tokenizer, vocab_fingerprint), "key_source": key_source(adapter), "dim": adapter.dim}


def open_datastore(ev, spec) -> OpenedDatastore:
    """Open ``spec.datastore`` (a folder, or a Datastore already open) for the model of ``ev``."""
    from lmmem.memories.knn import Datastore, KNNConfig

    config = spec.config or KNNConfig()
    store = spec.datastore
    if not isinstance(store, Datastore):
        vocab = ev.source.describe().get("vocab_fingerprint")
        store = Datastore.open(store, expect=identity(ev.adapter, ev.loaded.tokenizer, vocab))
    return OpenedDatastore(store, config)
