"""Tokens added to a pretrained model: how fast does each output head learn them during fine-tuning?

The situation of Rae et al. 2018 as practitioners meet it: a pretrained model gets new whole-word
tokens (domain terms, names) and is fine-tuned on a little in-domain text, so the new rows must be
learned from a handful of sightings. One command, resumable (every finished piece is kept in WORK)::

    python -m lmmem.experiments.new_tokens --gutenberg ../shared/data/gutenberg \\
        --news ../shared/data/news-abc --work WORK --page docs/results/new-tokens.md

1. **Data.** Gutenberg and ABC news prepared with ``python -m data_prep`` (word level, every type kept,
   so :meth:`~lmmem.data.corpus.PreparedCorpus.text_units` gives the running text).
2. **Tokenizer.** A byte-level BPE (``tokenizers``) trained on Gutenberg's train split. The new
   tokens are the ``--new-tokens`` most frequent alphabetic words of ABC news' train split that it
   splits into two or more pieces; they are added with ``tokenizer.add_tokens`` (whole words, the
   space before them absorbed).
3. **Pretraining**, per seed: a tiny Hugging Face GPT-2 (tied embeddings) with its stock head on
   Gutenberg's train split (random windows), saved with ``save_pretrained``. The number of times each
   token was a training target is kept (a Hebbian head starts from these counts: its ``λ`` is then
   what it would be had the rule run from the start, as in the binding experiment).
4. **Fine-tuning**, per seed and head, on identical batches of ABC news' train stream (``--batch-size``
   rows read in parallel from seed-dependent offsets) after ``resize_token_embeddings``:

   * ``stock-default``: the stock head, new rows as transformers initialises them by default
     (``mean_resizing=True``: the mean of the old rows, plus a negligible spread);
   * ``stock-pieces-mean``: the stock head, each new row (input and output: they are tied) set to the
     mean of the rows of the pieces the pretrained tokenizer split the word into;
   * ``hebbian``: :func:`lmmem.hf.apply_hebbian_softmax` with the default rule, applied before the
     resize (new rows as in ``stock-default``, counted as never seen; old rows' counts from
     pretraining); ``start_step=0`` because the model is trained already (the binding experiment's
     setting).

5. **Endpoints.** During fine-tuning, every target's NLL (from the forward before that step's update)
   is filed by ``k``, the token's sightings as a target in *earlier* batches. Primary: new tokens at
   k = 1, 2, 3–4, 5–9, 10–19 (mean over token types of each type's mean NLL; per seed, then the mean
   over seeds), with a bootstrap 95% interval over types of the seed-averaged value, and the paired
   difference to ``stock-default`` (same types, same positions). Guards: k = 0 (never seen: a head
   that is better there moved mass onto new tokens in general), the probability mass on all new tokens
   against their true share of the targets, and old tokens (their NLL in the fine-tuning stream and
   valid perplexity). Secondary: valid perplexity at the end, overall, old and new targets.

Nothing is tuned: all settings are fixed in advance, and the test splits are not read.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmmem.cli import ArgumentParser
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.experiments.binding import bootstrap_mean
from lmmem.experiments.paths import portable_command, portable_path
from lmmem.validation import check_flags

ARMS = ("stock-default", "stock-pieces-mean", "hebbian")
K_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 9), (10, 19))
K_NAMES = ["0", "1", "2", "3–4", "5–9", "10–19"]
K_MAX = 20  # NLL is kept per exact k below this (the chart), k >= K_MAX in one last slot
EOT = "<|endoftext|>"


@dataclass
class NewTokensConfig:
    gutenberg: str
    news: str
    work: str
    seeds: tuple[int, ...] = (1, 2, 3)
    arms: tuple[str, ...] = ARMS
    new_tokens: int = 200
    bpe_vocab: int = 4096
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    context: int = 128
    batch_size: int = 16
    pretrain_steps: int = 500
    pretrain_lr: float = 1e-3
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    warmup: int = 10
    valid_windows: int = 256
    bootstrap: int = 1000
    # one pretrained model (the first seed's) shared by all seeds, whose fine-tuning then differs in
    # the stream's offset only; True: a model pretrained per seed (three times the pretraining)
    pretrain_per_seed: bool = False

    def pretrain_seed(self, seed: int) -> int:
        return seed if self.pretrain_per_seed else self.seeds[0]

    def settings(self) -> dict:
        """What the results depend on (a WORK folder made with other settings is refused)."""
        d = asdict(self)
        for k in ("work", "gutenberg", "news", "seeds", "arms", "bootstrap"):
            d.pop(k)
        return d


# -- data and tokenizer ---------------------------------------------------------------------------
def prepare(kind: str, source: str, out: Path, log=print) -> PreparedCorpus:
    """``python -m data_prep`` (word level, every type kept) unless ``out`` is prepared already."""
    if not (out / "meta.json").is_file():
        log(f"preparing {source} into {out}")
        subprocess.run([sys.executable, "-m", "data_prep", kind, "--source", source, "--min-count", "1", "--keep-eval-types",
                        "--encoding-errors", "fallback", "--quiet", "--out", str(out)], check=True)
    return PreparedCorpus.open(out)


def train_tokenizer(gutenberg: PreparedCorpus, vocab_size: int, path: Path):
    """Byte-level BPE on Gutenberg's train split, as a ``PreTrainedTokenizerFast`` (saved to ``path``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(gutenberg.text_units("train"), trainer=trainer)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOT)


def choose_new_words(news: PreparedCorpus, tokenizer, n: int) -> list[dict]:
    """The ``n`` most frequent alphabetic words of the news train split that ``tokenizer`` splits
    into several pieces (as a word inside a sentence, i.e. after a space)."""
    counts = collections.Counter(w for unit in news.text_units("train") for w in unit.split())
    vocab = tokenizer.get_vocab()
    chosen = []
    for word, count in counts.most_common():
        if word.isalpha() and word not in vocab:  # (a word that is a piece already would not get a new token)
            pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
            if len(pieces) > 1:
                chosen.append({"word": word, "train_count": count, "pieces": pieces})
                if len(chosen) == n:
                    break
    return chosen


def add_words(tokenizer, words: list[dict]) -> list[dict]:
    """Add the words as whole tokens; returns them ordered by their new ids (``base, base + 1, ...``)."""
    from tokenizers import AddedToken

    base = len(tokenizer)
    tokenizer.add_tokens([AddedToken(w["word"], single_word=True, lstrip=True, normalized=False) for w in words])
    ids = tokenizer.convert_tokens_to_ids([w["word"] for w in words])
    if sorted(ids) != list(range(base, base + len(words))):
        raise LmmemError(f"add_tokens gave the {len(words)} new words ids {sorted(ids)[:3]}..., not {base}..{base + len(words) - 1}")
    return [w for _, w in sorted(zip(ids, words), key=lambda p: p[0])]


def encode(corpus: PreparedCorpus, split: str, tokenizer, chunk: int = 2000) -> np.ndarray:
    """The split's text units, tokenized, joined by the end-of-text token."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    batch: list[str] = []

    def flush():
        for row in tokenizer(batch, add_special_tokens=False).input_ids:
            ids.extend(row)
            ids.append(eot)
        batch.clear()

    for unit in corpus.text_units(split):
        batch.append(unit)
        if len(batch) == chunk:
            flush()
    flush()
    return np.asarray(ids, dtype=np.int64)


@dataclass
class Data:
    base_vocab: int
    vocab: int
    words: list[dict]
    gutenberg_train: np.ndarray
    gutenberg_valid: np.ndarray
    news_train: np.ndarray
    news_valid: np.ndarray
    sizes: dict = field(default_factory=dict)


def load_data(cfg: NewTokensConfig, log=print) -> Data:
    """Prepared corpora, tokenizer, new words and token streams, cached in WORK (``data.npz``)."""
    work = Path(cfg.work)
    cache = work / "data.npz"
    words_path = work / "new-words.json"
    gutenberg = prepare("gutenberg", cfg.gutenberg, work / "gutenberg", log)
    news = prepare("gigaword", cfg.news, work / "news", log)
    tokenizer = train_tokenizer(gutenberg, cfg.bpe_vocab, work / "tokenizer.json")
    base_vocab = len(tokenizer)
    if not words_path.is_file():
        _atomic_write(words_path, json.dumps(choose_new_words(news, tokenizer, cfg.new_tokens), indent=1))
    words = json.loads(words_path.read_text())
    streams = {}
    if not cache.is_file():
        log("tokenizing")
        streams = {f"gutenberg_{split}": encode(gutenberg, split, tokenizer) for split in ("train", "valid")}
    words = add_words(tokenizer, words)  # ordered by id: index j of the per-type arrays is token base_vocab + j
    if not cache.is_file():
        streams.update({f"news_{split}": encode(news, split, tokenizer) for split in ("train", "valid")})
        tmp = work / "data.tmp.npz"
        np.savez(tmp, **streams)
        tmp.replace(cache)
    arrays = np.load(cache)
    data = Data(base_vocab, base_vocab + len(words), words, *(arrays[k] for k in
                                                              ("gutenberg_train", "gutenberg_valid", "news_train", "news_valid")))
    # every occurrence of a new word as a whole word became its token (add_tokens' matching is what the
    # experiment relies on); it also matches the word before punctuation inside a word ("Australia's")
    found = np.bincount(data.news_train[data.news_train >= base_vocab] - base_vocab, minlength=len(words))
    if (found < np.array([w["train_count"] for w in words])).any():
        raise LmmemError("the extended tokenizer missed occurrences of the new words; the tokenizers version may match added tokens differently")
    for w, n in zip(words, found.tolist()):
        w["token_count"] = n
    data.sizes = {k: int(len(getattr(data, k))) for k in ("gutenberg_train", "gutenberg_valid", "news_train", "news_valid")}
    return data


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- model, pretraining ---------------------------------------------------------------------------
def gpt2(cfg: NewTokensConfig, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def _lr(step: int, steps: int, warmup: int, peak: float, cosine: bool) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def _train_step(model, opt, x: torch.Tensor, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def pretrain(cfg: NewTokensConfig, data: Data, seed: int, log=print) -> Path:
    """The stock GPT-2 trained on Gutenberg (random windows), saved to WORK/seedS/pretrained with the
    number of times each token was a target (``target_counts.npy``); reused when present."""
    out = Path(cfg.work) / f"seed{seed}" / "pretrained"
    if (out / "target_counts.npy").is_file():
        return out
    model = gpt2(cfg, data.base_vocab, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    counts = np.zeros(data.base_vocab, dtype=np.int64)
    model.train()
    t0 = time.monotonic()
    for step in range(cfg.pretrain_steps):
        starts = rng.integers(0, len(data.gutenberg_train) - cfg.context, size=cfg.batch_size)
        x = torch.from_numpy(np.stack([data.gutenberg_train[s : s + cfg.context] for s in starts]))
        loss = _train_step(model, opt, x, _lr(step, cfg.pretrain_steps, 50, cfg.pretrain_lr, cosine=True))
        counts += np.bincount(x[:, 1:].reshape(-1).numpy(), minlength=data.base_vocab)
        if (step + 1) % 50 == 0:
            log(f"seed {seed} pretraining step {step + 1}/{cfg.pretrain_steps}: loss {loss:.3f} ({time.monotonic() - t0:.0f} s)")
    valid = valid_nll(model, data.gutenberg_valid, cfg, data.base_vocab)
    tmp = out.with_name("pretrained.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    np.save(tmp / "pretrain.npy", np.array([valid["all"][0] / valid["all"][1], time.monotonic() - t0]))
    np.save(tmp / "target_counts.npy", counts)  # written last: its presence marks a finished pretraining
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


@torch.no_grad()
def valid_nll(model, tokens: np.ndarray, cfg: NewTokensConfig, base_vocab: int) -> dict:
    """NLL sums and target counts on non-overlapping windows: all targets, old tokens, new tokens."""
    was_training = model.training
    model.eval()
    n = min((len(tokens) - 1) // cfg.context, cfg.valid_windows)
    ids = torch.from_numpy(tokens[: n * cfg.context]).view(n, cfg.context)
    sums = {"all": [0.0, 0], "old": [0.0, 0], "new": [0.0, 0]}
    for i in range(0, n, cfg.batch_size):
        x = ids[i : i + cfg.batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        t = x[:, 1:].reshape(-1)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, reduction="none")
        for name, mask in (("all", torch.ones_like(t, dtype=torch.bool)), ("old", t < base_vocab), ("new", t >= base_vocab)):
            sums[name][0] += float(nll[mask].sum())
            sums[name][1] += int(mask.sum())
    model.train(was_training)
    return sums


# -- fine-tuning ----------------------------------------------------------------------------------
def start_model(cfg: NewTokensConfig, data: Data, seed: int, arm: str):
    """The pretrained model of ``seed`` with the vocabulary extended as ``arm`` does it."""
    from transformers import GPT2LMHeadModel

    from lmmem.hf import apply_hebbian_softmax, lmmem_head

    pre = pretrain(cfg, data, cfg.pretrain_seed(seed))
    model = GPT2LMHeadModel.from_pretrained(pre)
    if arm == "hebbian":
        apply_hebbian_softmax(model, start_step=0)
        lmmem_head(model).counts.copy_(torch.from_numpy(np.load(pre / "target_counts.npy")))
    torch.manual_seed(seed)  # the same draw for the new rows in every arm
    model.resize_token_embeddings(data.vocab)  # transformers' default: mean_resizing=True
    if arm == "stock-pieces-mean":
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            for j, w in enumerate(data.words):
                emb[data.base_vocab + j] = emb[w["pieces"]].mean(0)
    elif arm not in ("stock-default", "hebbian"):
        raise LmmemError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return model


def _measuring_hook(head, base_vocab: int, current: dict):
    """A forward hook on the head: for the batch in ``current["x"]``, every target's NLL and the
    probability mass on all new tokens, computed from the head's input with the rows as they are at
    that forward (before the optimizer step and the Hebbian update that follow it)."""

    @torch.no_grad()
    def hook(module, inputs, output):
        x = current.pop("x", None)
        if x is None:
            return
        h = inputs[0].detach()[:, :-1]
        lp = torch.nn.functional.linear(h, head.weight, head.bias).float().log_softmax(-1)
        lp = lp.reshape(-1, lp.shape[-1])
        t = x[:, 1:].reshape(-1)
        current["nll"] = (-lp.gather(1, t[:, None]).squeeze(1)).numpy()
        current["mass"] = float(lp[:, base_vocab:].logsumexp(1).exp().sum())

    return hook


def finetune(cfg: NewTokensConfig, data: Data, seed: int, arm: str, log=print) -> dict:
    """Fine-tune one arm on ABC news, measuring every target's NLL by sightings (see the module docstring)."""
    from lmmem.hf import attach_to_optimizer

    model = start_model(cfg, data, seed, arm)
    before = valid_nll(model, data.news_valid, cfg, data.base_vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.0)
    attach_to_optimizer(model, opt)
    current: dict = {}
    model.get_output_embeddings().register_forward_hook(_measuring_hook(model.get_output_embeddings(), data.base_vocab, current))
    stream, n_new, base = data.news_train, len(data.words), data.base_vocab
    offsets = np.arange(cfg.batch_size) * (len(stream) // cfg.batch_size) + (seed * 7919 * cfg.context) % len(stream)
    seen = np.zeros(n_new, dtype=np.int64)
    sums, cnts = np.zeros((K_MAX + 1, n_new)), np.zeros((K_MAX + 1, n_new), dtype=np.int64)
    old, mass, positions, new_targets, losses = [0.0, 0], 0.0, 0, 0, []
    model.train()
    t0 = time.monotonic()
    for step in range(cfg.finetune_steps):
        x = torch.from_numpy(stream[(offsets[:, None] + step * cfg.context + np.arange(cfg.context)[None, :]) % len(stream)])
        current["x"] = x
        losses.append(_train_step(model, opt, x, _lr(step, cfg.finetune_steps, cfg.warmup, cfg.finetune_lr, cosine=False)))
        nll, t = current.pop("nll"), x[:, 1:].reshape(-1).numpy()
        is_new = t >= base
        ids = t[is_new] - base
        k = np.minimum(seen[ids], K_MAX)
        np.add.at(sums, (k, ids), nll[is_new])
        np.add.at(cnts, (k, ids), 1)
        old[0] += float(nll[~is_new].sum())
        old[1] += int((~is_new).sum())
        mass += current.pop("mass")
        positions += t.size
        new_targets += ids.size
        seen += np.bincount(ids, minlength=n_new)
        if (step + 1) % 25 == 0:
            log(f"seed {seed} {arm} fine-tuning step {step + 1}/{cfg.finetune_steps}: loss {losses[-1]:.3f} "
                f"({time.monotonic() - t0:.0f} s)")
    minutes = (time.monotonic() - t0) / 60
    head = model.get_output_embeddings()
    # the rule's settings in effect (library defaults change; the page says what was run)
    rule = {k: getattr(head, k) for k in ("rule", "smoothing_limit", "gamma", "write_norm", "start_step", "write_momentum")
            if hasattr(head, "counts")}
    return {"arm": arm, "seed": seed, "minutes": round(minutes, 2), "rule": rule, "sums": sums.tolist(), "cnts": cnts.tolist(),
            "old_stream": old, "new_mass": mass / positions, "new_share": new_targets / positions,
            "valid_before": before, "valid_after": valid_nll(model, data.news_valid, cfg, data.base_vocab),
            "losses": [round(v, 4) for v in losses]}


# -- summary --------------------------------------------------------------------------------------
def _bucket(run: dict, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per new-token type: NLL sum and count over sightings k in [lo, hi]."""
    sums, cnts = np.asarray(run["sums"]), np.asarray(run["cnts"])
    return sums[lo : hi + 1].sum(0), cnts[lo : hi + 1].sum(0)


def _type_means(runs: list[dict], lo: int, hi: int) -> tuple[list[float], np.ndarray]:
    """Per seed the mean over types of each type's mean NLL, and per type its mean over the seeds
    that have it (NaN where none does)."""
    per_seed, per_type = [], []
    for run in runs:
        s, c = _bucket(run, lo, hi)
        m = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        per_type.append(m)
        per_seed.append(float(np.nanmean(m)) if np.isfinite(m).any() else math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a type no seed has in this bucket: NaN, left out later
        return per_seed, np.nanmean(np.stack(per_type), 0) if per_type else np.array([])


def _mean_sd(values: list[float]) -> list[float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return [math.nan, math.nan]
    return [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0]


def _ppl(sums: dict, part: str) -> float:
    s, n = sums[part]
    return math.exp(s / n) if n else math.nan


def summarise(runs: list[dict], arms: list[str], n_boot: int) -> dict:
    """Per arm: new tokens' NLL by k bucket (seed means, mean ± sd, bootstrap interval over types), the
    paired difference to ``stock-default``, the NLL curve over exact k, guards and valid perplexity."""
    boot = lambda v: bootstrap_mean(v[np.isfinite(v)], n_boot, np.random.default_rng(0))  # noqa: E731
    by_arm = {a: sorted((r for r in runs if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    ref = by_arm.get("stock-default")
    out = {}
    for arm, rs in by_arm.items():
        row = {"seeds": [r["seed"] for r in rs], "k": {}, "delta": {}, "curve": []}
        for name, (lo, hi) in zip(K_NAMES, K_BUCKETS):
            seed_means, per_type = _type_means(rs, lo, hi)
            row["k"][name] = {"seed_means": seed_means, "mean_sd": _mean_sd(seed_means), "ci": list(boot(per_type)),
                              "types": int(np.isfinite(per_type).sum())}
            if ref is not None and arm != "stock-default":
                ref_seed, ref_type = _type_means(ref, lo, hi)
                row["delta"][name] = {"seed_means": [a - b for a, b in zip(seed_means, ref_seed)], "ci": list(boot(per_type - ref_type))}
        for k in range(K_MAX):
            row["curve"].append(_mean_sd(_type_means(rs, k, k)[0])[0])
        row["new_mass"] = _mean_sd([r["new_mass"] for r in rs])
        row["new_share"] = _mean_sd([r["new_share"] for r in rs])
        row["old_stream_nll"] = _mean_sd([r["old_stream"][0] / r["old_stream"][1] for r in rs])
        for when in ("valid_before", "valid_after"):
            row[when] = {part: _mean_sd([_ppl(r[when], part) for r in rs]) for part in ("all", "old", "new")}
        row["minutes"] = sum(r["minutes"] for r in rs)
        out[arm] = row
    return out


def _verdict(ci: list[float], lower: str, higher: str) -> str:
    m, lo, hi = ci
    if not math.isfinite(m):
        return "not measured"
    if max(abs(lo), abs(hi)) < 0.01:
        return "no difference (|Δ| < 0.01 nats)"
    word = lower if hi < 0 else higher if lo > 0 else "no clear difference"
    return f"{word} (Δ {m:+.2f} [{lo:+.2f}, {hi:+.2f}] nats)"


def conclusions(summary: dict) -> list[str]:
    """Plain statements read off the intervals (so a re-run with another rule states its own)."""
    lines = []
    ref = summary.get("stock-default")
    for arm, row in summary.items():
        if arm == "stock-default" or not row["delta"]:
            continue
        d = row["delta"]
        lines.append(f"- **{arm} vs stock-default, new tokens:** 1st sighting (k=1) "
                     f"{_verdict(d['1']['ci'], 'lower NLL', 'higher NLL')}; k=2 {_verdict(d['2']['ci'], 'lower', 'higher')}; "
                     f"k=3–4 {_verdict(d['3–4']['ci'], 'lower', 'higher')}; k=10–19 {_verdict(d['10–19']['ci'], 'lower', 'higher')}.")
        guard = _verdict(d["0"]["ci"], "lower", "higher")
        lines.append(f"  Guards: never seen (k=0) {guard}; mass on new tokens {row['new_mass'][0]:.3f} vs "
                     f"{ref['new_mass'][0]:.3f} for stock-default (true share {row['new_share'][0]:.3f}); old tokens' "
                     f"NLL in the fine-tuning stream {row['old_stream_nll'][0]:.3f} vs {ref['old_stream_nll'][0]:.3f}; "
                     f"valid perplexity of old tokens {row['valid_after']['old'][0]:.1f} vs {ref['valid_after']['old'][0]:.1f}.")
    return lines


def _fmt(ms: list[float], digits: int = 2) -> str:
    m, sd = ms
    return "–" if not math.isfinite(m) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _ci(ci: list[float]) -> str:
    m, lo, hi = ci
    return "–" if not math.isfinite(m) else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def _interval(ci: list[float]) -> str:
    return "" if not math.isfinite(ci[0]) else f"[{ci[1]:.2f}, {ci[2]:.2f}]"


def render_page(results: dict, chart: str | None = None) -> str:
    c, s = results["config"], results["summary"]
    words = results["words"]
    listed = ", ".join(map(str, results["seeds"]))
    seeds = (f"Seeds {listed}: each pretrains its own model (initial weights, pretraining windows) and fine-tunes from its "
             "own offset in the news stream. " if c.get("pretrain_per_seed") else
             f"One pretrained model (seed {results['seeds'][0]}); seeds {listed} fine-tune it from different offsets in the news "
             "stream. ")
    lines = [f"# Tokens added to a pretrained model: {', '.join(s)}", "",
             "## What comes out", "", *conclusions(s), "",
             "## Setup", "",
             f"Tiny GPT-2 (tied embeddings, {c['n_layer']} layers, {c['n_embd']} wide, {c['n_head']} heads, context {c['context']}) "
             f"with a byte-level BPE of {results['base_vocab']} tokens trained on Gutenberg's train split; pretrained with the stock head "
             f"for {c['pretrain_steps']} steps of {c['batch_size']} × {c['context']} tokens (AdamW, lr {c['pretrain_lr']:g}, cosine); "
             f"Gutenberg valid loss after pretraining {_fmt(results['pretrain_valid_loss'], 3)} nats/token. "
             f"Then the {len(words)} most frequent words of ABC news' train split that the BPE splits "
             f"(from {words[0]['word']!r}, {words[0]['train_count']} times, to {words[-1]['word']!r}, {words[-1]['train_count']} times; "
             f"{results['new_share_of_train']:.1%} of the news training targets) are added as whole tokens "
             "(`tokenizer.add_tokens` + `model.resize_token_embeddings`), and each head is fine-tuned on identical batches of "
             f"ABC news for {c['finetune_steps']} steps (lr {c['finetune_lr']:g} after {c['warmup']} warm-up steps, fresh AdamW). "
             + seeds + "Heads:", "",
             "- `stock-default`: the stock head, new rows as transformers initialises them by default (`mean_resizing=True`: the mean "
             "of the old rows plus a spread scaled by 1e-9, i.e. the mean);",
             "- `stock-pieces-mean`: the stock head, each new row (input = output, tied) the mean of the rows of the word's BPE pieces;",
             "- `hebbian`: `apply_hebbian_softmax(model, start_step=0)` (default rule" + _rule_text(results.get("rules", {}).get("hebbian"))
             + ", written from the first step as in the binding "
             "experiment: the model is trained already), old rows' counts = their pretraining target counts, new rows as in "
             "`stock-default` and counted as never seen.", "",
             "k = the token's sightings as a target in earlier batches of fine-tuning; NLL from the forward before that step's update. "
             "At k = 0 (never seen) a rule cannot know the token: a rule that is better there moved probability onto new tokens "
             "in general (the mass guard below shows it); an initialisation from the word's pieces can know something already. "
             "Entries: mean over seeds of the mean over token types of each type's mean NLL (nats) ± sd over seeds "
             f"[bootstrap 95% interval of the mean over types of the seed-averaged value, {c['bootstrap']} resamples] (types).", "",
             "## New tokens' NLL by sighting", "",
             "| head | " + " | ".join(f"k={k}" for k in K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES)]
    for arm, row in s.items():
        lines.append(f"| {arm} | " + " | ".join(f"{_fmt(row['k'][k]['mean_sd'])} {_interval(row['k'][k]['ci'])} ({row['k'][k]['types']})"
                                               for k in K_NAMES) + " |")
    lines += ["", "Paired difference to `stock-default` (Δ NLL, nats; negative = learns the new token faster):", "",
              "| head | " + " | ".join(f"k={k}" for k in K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES)]
    for arm, row in s.items():
        if row["delta"]:
            lines.append(f"| {arm} | " + " | ".join(_ci(row["delta"][k]["ci"]) for k in K_NAMES) + " |")
    lines += ["", "## Guards and valid perplexity", "",
              "Mass: the probability the model puts on all new tokens, averaged over fine-tuning positions, against their true share "
              "of the targets. Valid: ABC news valid split "
              f"({c['valid_windows']} windows at most), perplexity over all targets, old tokens and new tokens, mean ± sd over seeds.", "",
              "| head | mass / share | old tokens' stream NLL | valid before | valid after | old | new |", "|---|---|---|---|---|---|---|"]
    for arm, row in s.items():
        va = row["valid_after"]
        lines.append(f"| {arm} | {row['new_mass'][0]:.3f} / {row['new_share'][0]:.3f} | {_fmt(row['old_stream_nll'], 3)} | "
                     f"{_fmt(row['valid_before']['all'], 1)} | {_fmt(va['all'], 1)} | {_fmt(va['old'], 1)} | {_fmt(va['new'], 1)} |")
    if chart:
        lines += ["", f"![new tokens' NLL by sighting]({chart})"]
    lines += ["", "## Command", "", "```", results["command"], "```", "",
              f"Machine: {results['machine']}; {results['minutes']:.0f} minutes of fine-tuning in all "
              f"({results['pretrain_minutes']:.0f} of pretraining).", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"stock-default": ("#444444", "o", "-"), "stock-pieces-mean": ("#1f77b4", "s", "--"), "hebbian": ("#d62728", "^", "-")}
    for arm, row in results["summary"].items():
        color, marker, line = styles.get(arm, (None, "x", ":"))
        ax.plot(range(len(row["curve"])), row["curve"], marker=marker, linestyle=line, color=color, markersize=4, label=arm)
    ax.set_xlabel("k = earlier sightings of the new token during fine-tuning")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # k counts sightings
    ax.set_ylabel("NLL of the new token (nats)")
    ax.set_title(f"{len(results['words'])} tokens added to a pretrained tiny GPT-2, fine-tuned on ABC news "
                 f"(mean over types and {len(results['seeds'])} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", frameon=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_page(results: dict, page: Path) -> None:
    """The page, its JSON (``PAGE.json``) and chart (``PAGE.png``) side by side."""
    page.parent.mkdir(parents=True, exist_ok=True)
    chart = page.with_suffix(".png")
    _atomic_write(page.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    plot(results, chart)
    _atomic_write(page, render_page(results, chart.name))


# -- the command ----------------------------------------------------------------------------------
def _check_settings(cfg: NewTokensConfig) -> None:
    path = Path(cfg.work) / "settings.json"
    settings = cfg.settings()
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise LmmemError(f"{cfg.work} holds runs made with other settings ({', '.join(f'{k}: {old.get(k)} → {settings.get(k)}' for k in differ)}); "
                             "use another --work, or the settings it was made with")
    else:
        _atomic_write(path, json.dumps(settings, indent=1))


def _rule_text(rule: dict | None) -> str:
    """", centred, T = 100" from a run's recorded rule settings; "" for runs from before they were recorded (T = 500)."""
    if not rule:
        return ""
    limit = rule["smoothing_limit"]
    momentum = f", momentum {'scaled' if rule['write_momentum'] == 'scale' else 'kept'}" if "write_momentum" in rule else ""
    return f", {rule['rule']}, T = {'∞' if limit is None else format(limit, 'g')}, γ = {rule['gamma']:g}{momentum}"


def run(cfg: NewTokensConfig, command: str = "", log=print) -> dict:
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg)
    data = load_data(cfg, log)
    runs, pretrain_info = [], []
    for seed in dict.fromkeys(cfg.pretrain_seed(s) for s in cfg.seeds):
        pretrain_info.append(np.load(pretrain(cfg, data, seed, log) / "pretrain.npy").tolist())
    for seed in cfg.seeds:
        for arm in cfg.arms:
            path = work / f"seed{seed}" / f"{arm}.json"
            if not path.is_file():
                log(f"seed {seed}: fine-tuning {arm}")
                _atomic_write(path, json.dumps(finetune(cfg, data, seed, arm, log)))
            runs.append(json.loads(path.read_text()))
    summary = summarise(runs, list(cfg.arms), cfg.bootstrap)
    new_targets = int((data.news_train >= data.base_vocab).sum())
    results = {
        "config": {**asdict(cfg), "gutenberg": portable_path(cfg.gutenberg), "news": portable_path(cfg.news),
                   "work": portable_path(cfg.work, "WORK")},
        "seeds": list(cfg.seeds), "base_vocab": data.base_vocab, "sizes": data.sizes,
        "words": [{"word": w["word"], "train_count": w["token_count"], "pieces": len(w["pieces"])} for w in data.words],
        "new_share_of_train": new_targets / len(data.news_train),
        "pretrain_valid_loss": _mean_sd([p[0] for p in pretrain_info]), "pretrain_minutes": sum(p[1] for p in pretrain_info) / 60,
        "summary": summary, "command": command,
        "rules": {r["arm"]: r["rule"] for r in runs if r.get("rule")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "minutes": sum(r["minutes"] for r in runs),
    }
    _atomic_write(work / "new-tokens.json", json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:
        for page in argv[1:]:
            write_page(json.loads(Path(page).with_suffix(".json").read_text()), Path(page))
            print(f"wrote {page}")
        return 0
    d = NewTokensConfig("", "", "")
    p = ArgumentParser(description="Tokens added to a pretrained tiny GPT-2: NLL of the new tokens at their k-th sighting during "
                       "fine-tuning, stock head (two initialisations) vs the Hebbian head; "
                       "'render PAGE' rewrites a page and chart from its JSON.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gutenberg", default="../shared/data/gutenberg", help="Gutenberg books folder (the pretraining text)")
    p.add_argument("--news", default="../shared/data/news-abc", help="ABC news folder (the fine-tuning text)")
    p.add_argument("--work", required=True, help="folder for prepared data, models and runs (resumable: a repeated command reuses them)")
    p.add_argument("--page", help="write the results page here (markdown), with its JSON and PNG chart beside it")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    for name in ("new_tokens", "bpe_vocab", "n_embd", "n_layer", "n_head", "context", "batch_size", "pretrain_steps",
                 "finetune_steps", "warmup", "valid_windows", "bootstrap"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--pretrain-per-seed", action="store_true",
                   help="pretrain a model per seed (default: the first seed's model, fine-tuned from each seed's stream offset)")
    for name in ("pretrain_lr", "finetune_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    args = p.parse_args(argv)
    check_flags(vars(args))
    for name in ("new_tokens", "bpe_vocab", "n_embd", "n_layer", "n_head", "context", "batch_size", "pretrain_steps",
                 "finetune_steps", "valid_windows", "bootstrap"):
        if getattr(args, name) < 1:
            raise LmmemError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if "stock-default" not in args.arms:
        raise LmmemError("--arms must include stock-default (the reference of the paired differences)")
    fields = {k: v for k, v in vars(args).items() if k in NewTokensConfig.__dataclass_fields__}
    cfg = NewTokensConfig(**{**fields, "seeds": tuple(args.seeds), "arms": tuple(args.arms)})
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()  # tiny configs make transformers warn about token ids
    transformers.utils.logging.disable_progress_bar()  # no bars for loading and saving each small model
    results = run(cfg, portable_command(argv, "python -m lmmem.experiments.new_tokens"))
    if args.page:
        write_page(results, Path(args.page))
        print(f"wrote {args.page}")
    for line in conclusions(results["summary"]):
        print(line)
    return 0


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
