"""Train a tiny Hugging Face causal LM (GPT-2 or Llama) on a prepared corpus with the HF Trainer.

    python -m lmmem.experiments.train_hf --data DATA --arch gpt2 --seed 1 --out runs/hf-gpt2-seed1 [--steps 2000]

The model reads the prepared corpus as text (:meth:`PreparedCorpus.text_units`: each unit's words
joined by spaces, ``<unk>`` kept), so it sees exactly the words an lmmem model of the corpus sees and
its word-level perplexity compares with theirs. Each unit is followed by a line break, which plays
the part of ``<eos>`` in the word stream: the text is the documents the evaluation engine reads
from a prepared corpus (unit + ``"\n"`` each, tokenized one by one, no special tokens added), so
the model is trained on exactly the token stream it is evaluated on.

1. **Tokenizer**: byte-level BPE trained with ``tokenizers`` on the train split's text only (no
   valid/test text leaks into the merges), GPT-2's pre-tokenization rule except that the corpora's
   ``<unk>`` word (with its leading space) stays one piece — by GPT-2's rule alone it would always
   cost three tokens (`` <``, ``unk``, ``>``). One special token, ``<|endoftext|>`` (id 0), is the
   tokenizer's BOS/EOS/padding token (a prefix for conventions that need one). Wrapped as a
   transformers fast tokenizer that adds no special tokens by itself and leaves spaces as they are
   (``decode(encode(text)) == text``).
2. **Model**: a random ``GPT2Config``/``LlamaConfig`` of ``--d-model``/``--layers``/``--heads``,
   tied input/output embeddings like lmmem's LSTM presets; Llama's feed-forward width is the
   SwiGLU ⅔·4d rounded up to a multiple of 8, so both have the same parameter count per layer.
3. **Training**: ``transformers.Trainer`` on disjoint ``--context``-token blocks of the train
   stream (shuffled by the Trainer's seeded sampler), AdamW, linear warm-up then cosine decay to
   ``--min-lr-ratio`` of the peak, validation loss on disjoint blocks of the valid split every
   ``--eval-interval`` steps; the checkpoint with the lowest validation loss is the model saved.
4. **Output**: ``save_pretrained`` of the model and the tokenizer into ``--out`` and ``run.json``
   (settings, steps, tokens, words, wall time, best validation loss, validation perplexity per token
   and per word), written last: a folder without ``run.json`` is not a finished run.

Deterministic given ``--seed`` on a given machine and thread count (the seed sets the initial
weights, the dropout noise and the block order). Resumable: the Trainer's checkpoints live in
``OUT/checkpoints``; the same command continues an interrupted run from the last one (weights,
optimizer, scheduler, RNG states and position in the data order), and a finished run with the same
settings is left alone. A run with other settings in ``OUT`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmmem.cli import ArgumentParser, add_dataclass_arguments, dataclass_from_args, run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.jsonio import write_json
from lmmem.progress import Progress
from lmmem.safety import FolderLock, check_writable_folder

ARCHS = ("gpt2", "llama")
DEVICES = ("cpu", "auto")
EOS = "<|endoftext|>"
# GPT-2's pre-tokenization rule (contractions, letters, digits, other symbols, each with its leading
# space), preceded by one alternative that keeps the corpora's `<unk>` word whole.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKENIZE_PATTERN = r" ?<unk>|" + GPT2_PATTERN
# how units become text; recorded in every run's settings so that a run made another way is not reused
TEXT_FORMAT = "units, each + line break"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# settings that do not change what is trained (a finished or interrupted run is reused whatever they are)
_NOT_SETTINGS = ("data", "out", "overwrite", "progress", "threads")


@dataclass
class HFTrainConfig:
    data: str = field(default="", metadata={"help": "prepared corpus folder (python -m data_prep)"})
    out: str = field(default="", metadata={"help": "model folder: save_pretrained output, tokenizer, run.json, checkpoints/"})
    arch: str = field(default="gpt2", metadata={"help": "model family", "choices": ARCHS})
    seed: int = field(default=1, metadata={"help": "random seed: initial weights, dropout noise, block order"})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size, the end-of-text token included"})
    d_model: int = field(default=128, metadata={"help": "hidden size (= embedding size)"})
    layers: int = field(default=2, metadata={"help": "transformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    context: int = field(default=256, metadata={"help": "tokens per training block; the model's maximum positions"})
    dropout: float = field(default=0.1, metadata={"help": "dropout (GPT-2: embeddings, residuals, attention; Llama: attention)"})
    batch_size: int = field(default=4, metadata={"help": "blocks per optimizer step"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr of the cosine decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    eval_interval: int = field(default=200, metadata={"help": "steps between validations and checkpoints"})
    eval_batch_size: int = field(default=16, metadata={"help": "blocks per validation batch"})
    device: str = field(default="cpu", metadata={"help": "cpu, or auto (the Trainer's choice: a GPU where there is one)",
                                                 "choices": DEVICES})
    threads: int = field(default=1, metadata={"help": "torch threads (the command line sets them for the process)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run with other settings in --out (without it: refused)"})
    progress: bool = field(default=True, metadata={"help": "progress lines"})

    def __post_init__(self):
        if not self.data or not self.out:
            raise ValueError("give --data (a prepared corpus folder) and --out (the model folder)")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        positive = ("vocab_size", "d_model", "layers", "heads", "context", "batch_size", "steps", "eval_interval",
                    "eval_batch_size", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model {self.d_model} is not a multiple of --heads {self.heads}")
        if self.vocab_size < 300:
            raise ValueError(f"--vocab-size {self.vocab_size} is below the 256 bytes + specials a byte-level BPE needs; use 300 or more")
        if not (0 <= self.dropout < 1 and 0 <= self.min_lr_ratio <= 1 and self.lr > 0):
            raise ValueError("--dropout and --min-lr-ratio must lie in [0, 1) and [0, 1], --lr must be positive")

    def settings(self) -> dict:
        """What determines the trained model: compared to decide whether a folder's run is this one."""
        return {**{k: v for k, v in asdict(self).items() if k not in _NOT_SETTINGS}, "text": TEXT_FORMAT}


# ---------------------------------------------------------------- tokenizer and text


def train_tokenizer(units, vocab_size: int):
    """Byte-level BPE trained on ``units`` (strings), wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes → printable symbols
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(units, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def unit_documents(units):
    """Each unit followed by a line break: the documents the evaluation engine reads from a prepared
    corpus for a model with its own tokenizer (the line break is the unit's ``<eos>`` word)."""
    for unit in units:
        yield unit + "\n"


def encode_units(tokenizer, units, chunk: int = 4096) -> np.ndarray:
    """The token stream of ``units``: every document of :func:`unit_documents` tokenized on its own
    (so no token spans two units), no special tokens added, one after another."""
    backend = tokenizer.backend_tokenizer
    parts = [np.zeros(0, dtype=np.int32)]
    batch: list[str] = []

    def flush():
        parts.extend(np.array(enc.ids, dtype=np.int32) for enc in backend.encode_batch(batch, add_special_tokens=False))
        batch.clear()

    for doc in unit_documents(units):
        batch.append(doc)
        if len(batch) == chunk:
            flush()
    flush()
    return np.concatenate(parts)


class Blocks(torch.utils.data.Dataset):
    """Disjoint ``context``-token blocks of a token stream (the incomplete tail is dropped), each a
    training example whose labels are its inputs (the model shifts them)."""

    def __init__(self, ids: np.ndarray, context: int):
        n = len(ids) // context
        if n == 0:
            raise LmmemError(f"the split has {len(ids)} tokens, fewer than one --context block of {context}; lower --context")
        self.blocks = torch.from_numpy(ids[: n * context].astype(np.int64)).view(n, context)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# ---------------------------------------------------------------- model


def feed_forward_width(cfg: HFTrainConfig) -> int:
    """GPT-2: 4·d. Llama (SwiGLU, three matrices): ⅔·4·d rounded up to a multiple of 8, the same
    parameters per layer."""
    if cfg.arch == "gpt2":
        return 4 * cfg.d_model
    return -(-(8 * cfg.d_model // 3) // 8) * 8


def build_model(cfg: HFTrainConfig, vocab_size: int, eos_id: int):
    """A random model of ``cfg``'s family and sizes; its initial weights are drawn from the seed."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(cfg.seed)
    ids = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True)
    if cfg.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.context, n_embd=cfg.d_model, n_layer=cfg.layers,
                            n_head=cfg.heads, n_inner=feed_forward_width(cfg), resid_pdrop=cfg.dropout,
                            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **ids)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=feed_forward_width(cfg),
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.context, attention_dropout=cfg.dropout, **ids)
    return LlamaForCausalLM(config)


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


@torch.no_grad()
def stream_nll(model, ids: np.ndarray, context: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed NLL (nats, float64) of every token of ``ids`` after the first, and their number.
    Windows of ``context`` tokens at a stride of ``context // 2``; each window scores only the
    targets the previous one did not, so every target after the first window has at least half a
    window of left context (Hugging Face's strided evaluation). The model is left in the mode it
    was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stride = max(1, context // 2)
    starts = [0]
    while starts[-1] + context < len(ids):
        starts.append(starts[-1] + stride)
    total, count = 0.0, 0
    full = [s for s in starts if s + context <= len(ids)]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in starts if s not in full]
    for group in groups:
        windows = torch.from_numpy(np.stack([ids[s : s + context] for s in group]).astype(np.int64)).to(device)
        if windows.shape[1] < 2:
            continue
        logp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(2, windows[:, 1:, None])[..., 0]
        for row, s in zip(nll, group):
            first = 0 if s == 0 else context - stride - 1  # targets the previous window scored
            total += row[first:].sum().item()
            count += row[first:].numel()
    assert count == len(ids) - 1, (count, len(ids))
    model.train(was_training)
    return total, count


# ---------------------------------------------------------------- training


def run_state(out: Path, cfg: HFTrainConfig) -> str:
    """``finished`` (OUT/run.json with these settings), ``resumable`` (checkpoints of these
    settings), ``new`` (nothing there) or ``other`` (a run with other settings)."""
    done = out / RUN_FILE
    if done.is_file():
        return "finished" if json.loads(done.read_text())["settings"] == cfg.settings() else "other"
    started = out / CHECKPOINTS / "settings.json"
    if started.is_file():
        return "resumable" if json.loads(started.read_text()) == cfg.settings() else "other"
    return "new" if not out.exists() or all(p.name == ".lock" for p in out.iterdir()) else "other"


def train_hf(cfg: HFTrainConfig, *, callbacks=()) -> dict:
    """Train (or continue, or reuse) the run of ``cfg``; returns its ``run.json`` record.
    ``callbacks``: extra ``TrainerCallback``s (a run stopped by one before ``cfg.steps`` is left
    resumable, not finished)."""
    out = Path(cfg.out)
    check_writable_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out / ".lock", f"model folder {out}"):
        state = run_state(out, cfg)
        if state == "finished":
            return json.loads((out / RUN_FILE).read_text())
        if state == "other":
            if not cfg.overwrite:
                raise LmmemError(f"{out} holds another run (other settings, or files that are not a run); "
                                 "choose another --out, or --overwrite to replace it")
            for child in out.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            state = "new"
        return _train(cfg, out, resume=state == "resumable", callbacks=callbacks)


def _train(cfg: HFTrainConfig, out: Path, *, resume: bool, callbacks) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerState, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    corpus = PreparedCorpus.open(cfg.data)
    ckpt = out / CHECKPOINTS
    ckpt.mkdir(exist_ok=True)
    tok_dir = ckpt / "tokenizer"
    if resume and (tok_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(unit_documents(corpus.text_units("train")), cfg.vocab_size)
        tokenizer.model_max_length = cfg.context
        tokenizer.save_pretrained(tok_dir)
    (ckpt / "settings.json").write_text(json.dumps(cfg.settings(), indent=1))
    streams = {split: encode_units(tokenizer, corpus.text_units(split)) for split in ("train", "valid")}
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    args = TrainingArguments(
        output_dir=str(ckpt), use_cpu=cfg.device == "cpu", seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        max_steps=cfg.steps, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        eval_strategy="steps", eval_steps=cfg.eval_interval, save_strategy="steps", save_steps=cfg.eval_interval,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=min(50, cfg.eval_interval), report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    last = _last_checkpoint(ckpt) if resume else None
    if last is not None:
        state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        if state.global_step >= cfg.steps:
            # killed after the last checkpoint (while saving the model): the Trainer, resumed at
            # max_steps, would take one more step, so take the best checkpoint as it stands
            best = AutoModelForCausalLM.from_pretrained(ckpt / Path(state.best_model_checkpoint).name)
            seconds = json.loads((Path(last) / "wall.json").read_text())["seconds"]
            return _finish(cfg, out, best, state, tokenizer, corpus, streams, seconds)
    clock = clock_callback(ckpt, cfg.steps, cfg.progress)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(streams["train"], cfg.context),
                      eval_dataset=Blocks(streams["valid"], cfg.context), callbacks=[clock, *callbacks])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=last)
    clock.close()
    if trainer.state.global_step < cfg.steps:  # stopped early by a callback: leave it resumable
        return {"stopped_at": trainer.state.global_step}
    # load_best_model_at_end: trainer.model is the checkpoint with the lowest validation loss
    return _finish(cfg, out, trainer.model, trainer.state, tokenizer, corpus, streams, clock.seconds)


def _finish(cfg, out, model, state, tokenizer, corpus, streams, seconds) -> dict:
    """Save the best model and tokenizer into OUT, measure it on valid, write run.json last."""
    best = state.best_metric
    total, count = stream_nll(model, streams["valid"], cfg.context, cfg.eval_batch_size)
    words = {split: int(corpus.meta["splits"][split]["tokens"]) for split in ("train", "valid")}
    record = {
        "settings": cfg.settings(),
        "model": {"arch": cfg.arch, "parameters": parameter_counts(model), "feed_forward": feed_forward_width(cfg),
                  "vocab_size": len(tokenizer)},
        "steps": state.global_step,
        "best_step": _best_step(state),
        "train_tokens": state.global_step * cfg.batch_size * cfg.context,
        "split_tokens": {s: int(len(ids) - 1) for s, ids in streams.items()},
        "split_words": words,  # words + one <eos> (line break) per unit: the lmmem model's token count
        "train_seconds": round(seconds, 1),
        "valid": {"block_loss": best, "block_perplexity": math.exp(best),
                  "token_loss": total / count, "token_perplexity": math.exp(total / count),
                  "word_loss": total / words["valid"], "word_perplexity": math.exp(total / words["valid"])},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": _versions(),
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(record, out / RUN_FILE)  # last: its presence marks a finished run
    return record


def _best_step(state) -> int | None:
    path = state.best_model_checkpoint
    return int(Path(path).name.rsplit("-", 1)[1]) if path else None


def _last_checkpoint(folder: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _versions() -> dict:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def clock_callback(folder: Path, total: int, enabled: bool):
    """A ``TrainerCallback`` printing progress lines and summing the training wall time over
    resumes (stored in each checkpoint as ``wall.json``). Defined here because transformers is
    imported lazily."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            last = _last_checkpoint(folder)
            wall = Path(last) / "wall.json" if last else None
            self.before = json.loads(wall.read_text())["seconds"] if wall is not None and wall.is_file() else 0.0
            self.t0 = time.monotonic()
            self.bar = None

        @property
        def seconds(self) -> float:
            return self.before + time.monotonic() - self.t0

        def on_train_begin(self, args, state, control, **kw):
            self.bar = Progress(total, "train", initial=state.global_step, enabled=enabled)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs.get('learning_rate', 0):.2e}")
            if logs and "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: valid loss {logs['eval_loss']:.4f} (ppl {math.exp(logs['eval_loss']):.2f})")

        def on_save(self, args, state, control, **kw):
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if saved.is_dir():
                (saved / "wall.json").write_text(json.dumps({"seconds": self.seconds}))

        def close(self):
            if self.bar is not None:
                self.bar.close()

    return Clock()


# ---------------------------------------------------------------- command line


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    p = ArgumentParser(prog="python -m lmmem.experiments.train_hf", description=__doc__.split("\n\n")[0])
    return p, add_dataclass_arguments(p, HFTrainConfig)


def main(argv=None) -> int:
    p, dests = build_parser()
    cfg = dataclass_from_args(HFTrainConfig, p.parse_args(argv), dests)
    torch.set_num_threads(cfg.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # a tiny config's token ids make it warn
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's per-shard bar, once per checkpoint
    record = train_hf(cfg)
    if "stopped_at" in record:
        print(f"stopped at step {record['stopped_at']}; run the same command again to continue")
        return 130
    v = record["valid"]
    print(f"{cfg.out}: {record['steps']} steps, {record['train_tokens']:,} tokens, best step {record['best_step']}, "
          f"valid loss {v['block_loss']:.4f}; per token {v['token_perplexity']:.2f}, per word {v['word_perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
