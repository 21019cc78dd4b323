"""One-shot / rare-class curriculum: how fast does each output layer bind a new class?

The protocol follows the Omniglot curriculum of Rae et al. 2018 (Hebbian softmax, section on
Omniglot) in spirit, on procedural glyphs (:mod:`lmmem.data.glyphs`) so that it runs offline, or on
real Omniglot via ``--omniglot PATH_OR_NAME``:

1. **Background phase** (same for all methods): ``background_steps`` mini-batches drawn at random from
   ``background_classes`` classes with a few samples each, so the convnet learns stroke features.
   (Our addition, like Omniglot's background split; the memory is *not* reset afterwards.)
2. **Curriculum**: ``num_classes`` new classes are introduced over time; each appears only
   ``presentations`` times, at random gaps (exponential, mean ``mean_gap`` stream items, at least
   ``min_gap``), interleaved with the others. The stream is cut into mini-batches; for each batch the
   model first *predicts* (no learning), then trains one step on it with the labels. So the j-th
   presentation of a class is predicted after the class was shown ``j − 1`` times; the 1st is at
   chance for a softmax (the class has never been a target) and always wrong for a memory (no slot
   holds the label).

Reported: top-1 accuracy by presentation number j = 1..P, and for j ≥ 2 by the number of stream items
since the class was last seen. Methods, all with the same convnet, steps and batches:

* ``softmax``     — :class:`~lmmem.output_layers.full_softmax.FullSoftmax`, Adam;
* ``hebbian``     — :class:`~lmmem.output_layers.hebbian_softmax.HebbianSoftmax`, Adam;
* ``kv_memory``   — :class:`~lmmem.memories.kv_memory.KeyValueMemory` (Kaiser et al. 2017), Adam on
  convnet + controller with the memory loss;
* ``kv_memory_sg``— the same memory whose controller is trained by synthetic gradients at a fast
  learning rate, the convnet at a slow one (:mod:`lmmem.memories.synthetic_gradients`);
* ``pixel_nn``    — a reference without learning: the label of the most similar (cosine, mean-removed
  pixels) of all training images seen so far (an unbounded memory on raw pixels).

A text counterpart, :func:`name_recall`, measures top-1 accuracy at the 2nd/3rd occurrence of a name
within a document of the embedded synthetic corpus (:mod:`lmmem.data.synthetic`).

    python -m lmmem.experiments.curriculum [--classes 300] [--presentations 5] [--omniglot PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmmem.cli import ArgumentParser, run_cli
from lmmem.data.glyphs import GlyphConfig, load_omniglot, make_glyphs
from lmmem.errors import LmmemError
from lmmem.memories.kv_memory import KeyValueMemory, KVMemoryConfig
from lmmem.memories.synthetic_gradients import FastSlowConfig, FastSlowMemoryLearner, SyntheticGradient
from lmmem.output_layers.full_softmax import FullSoftmax
from lmmem.output_layers.hebbian_softmax import HebbianSoftmax
from lmmem.validation import check_flags

METHODS = ("softmax", "hebbian", "kv_memory", "kv_memory_sg", "pixel_nn")
GAP_BUCKETS = (0, 50, 150, 400)  # items since last seen: [0,50), [50,150), [150,400), [400,∞)


@dataclass(frozen=True)
class CurriculumConfig:
    seed: int = 0
    num_classes: int = 300  # classes introduced during the curriculum
    presentations: int = 5  # times each is shown
    background_classes: int = 1000  # many classes, few samples each: 100 × 20 overfit the convnet (see docs)
    background_samples: int = 5
    background_steps: int = 1500
    batch_size: int = 16
    mean_gap: float = 80.0  # stream items between two presentations of a class (mean)
    min_gap: int = 32  # in the stream's time units (≈ items): two presentations rarely share a batch
    image_size: int = 28
    embed: int = 64  # convnet output features
    lr: float = 1e-3  # Adam, all but the synthetic-gradient learner
    softmax_bias: bool = False  # see _SoftmaxLearner
    hebbian_gamma: float = 0.01
    hebbian_smoothing_limit: int = 100
    hebbian_rule: str = "centred"  # HebbianSoftmax's default; "paper" for Rae et al.'s exact rule
    hebbian_write_norm: str = "running"  # centred rule only
    memory_size: int = 4096
    memory_k: int = 64
    key_size: int = 64
    memory_margin: float = 0.1
    # The synthetic-gradient learner uses SGD with momentum (Adam on the controller, which normalises the
    # predicted gradients' scale, wrecked the controller in our runs), so it does not use ``lr``.
    sg_fast_lr: float = 0.05  # controller (query projection)
    sg_slow_lr: float = 0.01  # convnet
    sg_lr: float = 1e-3  # feedback path (Adam)
    sg_hidden: int = 128
    methods: tuple[str, ...] = METHODS

    def validate(self) -> None:
        for name in ("num_classes", "presentations", "batch_size", "embed", "memory_size", "memory_k", "key_size"):
            if getattr(self, name) <= 0:
                raise LmmemError(f"CurriculumConfig.{name} must be positive, got {getattr(self, name)}")
        if self.background_steps and (self.background_classes <= 0 or self.background_samples <= 0):
            raise LmmemError("background_steps > 0 needs background_classes and background_samples > 0")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise LmmemError(f"unknown method(s) {bad}; choose from {METHODS}")


# -- data -----------------------------------------------------------------------------------------

@dataclass
class GlyphPools:
    """Curriculum samples ``curr[c, j]`` (C, P, 1, S, S) and background images/labels (labels offset by C)."""
    curr: torch.Tensor
    bg_images: torch.Tensor
    bg_labels: torch.Tensor


def procedural_pools(cfg: CurriculumConfig) -> GlyphPools:
    gcfg = GlyphConfig(seed=cfg.seed, image_size=cfg.image_size)
    x, _ = make_glyphs(cfg.num_classes, cfg.presentations, gcfg)
    curr = x.reshape(cfg.num_classes, cfg.presentations, 1, cfg.image_size, cfg.image_size)
    if cfg.background_steps:
        bx, by = make_glyphs(range(cfg.num_classes, cfg.num_classes + cfg.background_classes), cfg.background_samples, gcfg)
    else:
        bx, by = torch.zeros(0, 1, cfg.image_size, cfg.image_size), torch.zeros(0, dtype=torch.long)
    return GlyphPools(curr, bx, by)


def pools_from_dataset(images: torch.Tensor, labels: torch.Tensor, cfg: CurriculumConfig) -> GlyphPools:
    """Split a labelled image set (e.g. :func:`load_omniglot`) into curriculum and background classes:
    the first ``num_classes`` classes (with ≥ ``presentations`` samples) for the curriculum, the next
    ``background_classes`` for the background phase."""
    rng = np.random.default_rng(cfg.seed)
    classes = [int(c) for c in torch.unique(labels).tolist()]
    need = cfg.num_classes + (cfg.background_classes if cfg.background_steps else 0)
    enough = [c for c in classes if int((labels == c).sum()) >= cfg.presentations]
    if len(enough) < need:
        raise LmmemError(f"the data set has {len(enough)} classes with >= {cfg.presentations} samples; the curriculum needs "
                         f"{need} (lower --classes / --background-classes)")
    order = rng.permutation(enough)
    curr = []
    for c in order[:cfg.num_classes]:
        idx = torch.nonzero(labels == int(c)).flatten()[: cfg.presentations]
        curr.append(images[idx])
    bx, by = [], []
    for i, c in enumerate(order[cfg.num_classes:need]):
        idx = torch.nonzero(labels == int(c)).flatten()[: cfg.background_samples]
        bx.append(images[idx])
        by.append(torch.full((len(idx),), cfg.num_classes + i, dtype=torch.long))
    S = images.shape[-1]
    return GlyphPools(torch.stack(curr), torch.cat(bx) if bx else torch.zeros(0, 1, S, S),
                      torch.cat(by) if by else torch.zeros(0, dtype=torch.long))


def build_stream(cfg: CurriculumConfig) -> dict[str, np.ndarray]:
    """The curriculum order: arrays ``cls``, ``presentation`` (1-based) and ``since`` (stream items
    since the class was last shown; -1 for a first presentation), one entry per stream item."""
    rng = np.random.default_rng([cfg.seed, 7])
    C, P = cfg.num_classes, cfg.presentations
    intro = np.sort(rng.uniform(0, C * P * 0.6, C))  # classes arrive over the first ~60% of the stream
    gaps = cfg.min_gap + rng.exponential(max(cfg.mean_gap - cfg.min_gap, 1e-6), size=(C, P - 1))
    times = np.concatenate([intro[:, None], intro[:, None] + np.cumsum(gaps, 1)], 1)  # (C, P) continuous
    cls = np.repeat(np.arange(C), P)
    pres = np.tile(np.arange(1, P + 1), C)
    order = np.argsort(times.reshape(-1), kind="stable")
    cls, pres = cls[order], pres[order]
    since = np.full(len(cls), -1)
    last: dict[int, int] = {}
    for i, c in enumerate(cls.tolist()):
        if c in last:
            since[i] = i - last[c]
        last[c] = i
    return {"cls": cls, "presentation": pres, "since": since}


# -- models ---------------------------------------------------------------------------------------

class ConvNet(nn.Module):
    """Small convnet: two strided 3×3 convs (16, 32 channels), one more 3×3 conv (32), a linear embedding."""

    def __init__(self, image_size: int, embed: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.fc = nn.Linear(32 * side * side, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class _Learner:
    """predict(x) → labels (no learning); train(x, y) → one step."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError


class _SoftmaxLearner(_Learner):
    """Softmax over all classes (background + curriculum). No bias by default: while a class is unseen
    the softmax gradient drives its bias down at every step, and the Hebbian rule (which writes rows,
    not biases) cannot undo that when the class finally appears."""

    def __init__(self, cfg: CurriculumConfig, total: int, hebbian: bool):
        self.net = ConvNet(cfg.image_size, cfg.embed)
        rule = {"rule": cfg.hebbian_rule} | ({"write_norm": cfg.hebbian_write_norm} if cfg.hebbian_rule != "paper" else {})
        self.head = (HebbianSoftmax(cfg.embed, total, gamma=cfg.hebbian_gamma, smoothing_limit=cfg.hebbian_smoothing_limit,
                                    bias=cfg.softmax_bias, **rule)
                     if hebbian else FullSoftmax(cfg.embed, total, bias=cfg.softmax_bias))
        self.opt = torch.optim.Adam([*self.net.parameters(), *self.head.parameters()], lr=cfg.lr)
        self.head.attach_to_optimizer(self.opt)  # the Hebbian rule runs after every step (no-op for FullSoftmax)

    @torch.no_grad()
    def predict(self, x):
        return self.head.logits(self.net(x)).argmax(-1)

    def train(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        self.head.loss(self.net(x), y).backward()
        self.opt.step()


class _MemoryLearner(_Learner):
    def __init__(self, cfg: CurriculumConfig, total: int):
        self.net = ConvNet(cfg.image_size, cfg.embed)
        self.mem = KeyValueMemory(KVMemoryConfig(cfg.embed, total, key_size=cfg.key_size, memory_size=cfg.memory_size,
                                                 k=cfg.memory_k, margin=cfg.memory_margin, seed=cfg.seed))
        self.opt = torch.optim.Adam([*self.net.parameters(), *self.mem.parameters()], lr=cfg.lr)

    @torch.no_grad()
    def predict(self, x):
        return self.mem(self.net(x), update=False).prediction

    def train(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        out = self.mem(self.net(x), y, update=True)
        if out.loss.requires_grad:
            out.loss.backward()
            self.opt.step()


class _SGMemoryLearner(_Learner):
    def __init__(self, cfg: CurriculumConfig, total: int):
        net = ConvNet(cfg.image_size, cfg.embed)
        mem = KeyValueMemory(KVMemoryConfig(cfg.embed, total, key_size=cfg.key_size, memory_size=cfg.memory_size,
                                            k=cfg.memory_k, margin=cfg.memory_margin, seed=cfg.seed))
        sg = SyntheticGradient(cfg.key_size, total, cfg.sg_hidden)
        fs = FastSlowConfig(fast_lr=cfg.sg_fast_lr, slow_lr=cfg.sg_slow_lr, sg_lr=cfg.sg_lr, optimizer="sgd")
        self.learner = FastSlowMemoryLearner(net, mem, sg, fs)

    def predict(self, x):
        return self.learner.predict(x)

    def train(self, x, y):
        self.learner.step(x, y)


class _PixelNNLearner(_Learner):
    """Nearest neighbour on raw pixels over every training image seen so far (no parameters)."""

    def __init__(self, cfg: CurriculumConfig, total: int):
        self.keys: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    @staticmethod
    def _embed(x):
        f = x.flatten(1)
        return F.normalize(f - f.mean(1, keepdim=True), dim=1)

    def predict(self, x):
        if not self.keys:
            return torch.full((x.shape[0],), -1, dtype=torch.long)
        self.keys, self.labels = [torch.cat(self.keys)], [torch.cat(self.labels)]
        return self.labels[0][(self._embed(x) @ self.keys[0].T).argmax(1)]

    def train(self, x, y):
        self.keys.append(self._embed(x))
        self.labels.append(y.clone())


def make_learner(method: str, cfg: CurriculumConfig, total: int) -> _Learner:
    if method == "softmax":
        return _SoftmaxLearner(cfg, total, hebbian=False)
    if method == "hebbian":
        return _SoftmaxLearner(cfg, total, hebbian=True)
    if method == "kv_memory":
        return _MemoryLearner(cfg, total)
    if method == "kv_memory_sg":
        return _SGMemoryLearner(cfg, total)
    if method == "pixel_nn":
        return _PixelNNLearner(cfg, total)
    raise LmmemError(f"unknown method {method!r}; choose from {METHODS}")


# -- the run --------------------------------------------------------------------------------------

def run_method(method: str, cfg: CurriculumConfig, pools: GlyphPools, stream: dict[str, np.ndarray]) -> dict:
    torch.manual_seed(cfg.seed)  # same convnet initialisation for every method
    total = cfg.num_classes + (cfg.background_classes if cfg.background_steps else 0)
    learner = make_learner(method, cfg, total)
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 11])
    for _ in range(cfg.background_steps):
        idx = torch.from_numpy(rng.integers(len(pools.bg_labels), size=cfg.batch_size))
        learner.train(pools.bg_images[idx], pools.bg_labels[idx])
    t_bg = time.perf_counter() - t0
    cls, pres = torch.from_numpy(stream["cls"]), torch.from_numpy(stream["presentation"])
    correct = np.zeros(len(cls), dtype=bool)
    for lo in range(0, len(cls), cfg.batch_size):
        c, p = cls[lo:lo + cfg.batch_size], pres[lo:lo + cfg.batch_size]
        x = pools.curr[c, p - 1]
        correct[lo:lo + len(c)] = (learner.predict(x) == c).numpy()  # predict first ...
        learner.train(x, c)  # ... then learn from the labels
    return {"method": method, "correct": correct, "seconds": time.perf_counter() - t0, "background_seconds": t_bg}


def summarise(result: dict, stream: dict[str, np.ndarray], cfg: CurriculumConfig) -> dict:
    correct, pres, since = result["correct"], stream["presentation"], stream["since"]
    row = {"method": result["method"]}
    for j in range(1, cfg.presentations + 1):
        row[f"acc@{j}"] = float(correct[pres == j].mean())
    later = pres >= 2
    row["acc@2+"] = float(correct[later].mean()) if later.any() else float("nan")
    edges = list(GAP_BUCKETS) + [np.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = later & (since >= lo) & (since < hi)
        key = f"gap {lo}-{'' if np.isinf(hi) else int(hi)}"
        row[key] = float(correct[m].mean()) if m.any() else float("nan")
        row.setdefault("items_per_gap_bucket", {})[key] = int(m.sum())
    row["seconds"] = result["seconds"]
    return row


def run_curriculum(cfg: CurriculumConfig = CurriculumConfig(), pools: GlyphPools | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run every method of ``cfg.methods``; returns ``{"config", "rows", "stream_items"}``."""
    cfg.validate()
    pools = pools if pools is not None else procedural_pools(cfg)
    stream = build_stream(cfg)
    rows = []
    for m in cfg.methods:
        res = run_method(m, cfg, pools, stream)
        rows.append(summarise(res, stream, cfg))
        if log:
            log(f"{m}: " + ", ".join(f"{k}={v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)))
    cdict = asdict(cfg)
    return {"config": cdict, "rows": rows, "stream_items": int(len(stream["cls"])),
            "gap_stats": {"mean": float(stream["since"][stream["since"] >= 0].mean()) if cfg.presentations > 1 else None}}


def plot(rows: list[dict], presentations: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    js = list(range(1, presentations + 1))
    lrs = sorted({r["lr"] for r in rows if isinstance(r.get("lr"), float)}, reverse=True)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for r in rows:
        lr = r.get("lr")
        style = ["-", "--", ":", "-."][lrs.index(lr) % 4] if isinstance(lr, float) else "-"
        label = f"{r['method']} (lr {lr:g})" if isinstance(lr, float) and len(lrs) > 1 else r["method"]
        ax.plot(js, [r[f"acc@{j}"] for j in js], style, marker="o", ms=3, color=colors.get(r["method"]), label=label)
    ax.set_xlabel("presentation of the class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_xticks(js)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- text: names on their 2nd / 3rd occurrence in a document ---------------------------------------

def name_occurrences(doc: np.ndarray, is_name: np.ndarray) -> np.ndarray:
    """For each position of ``doc`` (token ids), the occurrence number of its token within the doc if
    it is a name (1 = first), else 0."""
    out = np.zeros(len(doc), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, t in enumerate(doc.tolist()):
        if is_name[t]:
            seen[t] = seen.get(t, 0) + 1
            out[i] = seen[t]
    return out


def name_recall(predict_next: Callable[[np.ndarray], np.ndarray], docs: list[np.ndarray], is_name: np.ndarray,
                occurrences: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """Top-1 accuracy of ``predict_next`` at positions whose target is a name on its k-th occurrence
    in the document. ``predict_next(doc)`` returns, for a doc of T tokens, the (T−1,) predicted ids of
    tokens 1..T given the prefix (any model: an LM checkpoint's argmax, a cache, a baseline)."""
    hits = {k: [0, 0] for k in occurrences}
    for doc in docs:
        if len(doc) < 2:
            continue
        pred = np.asarray(predict_next(doc))
        occ = name_occurrences(doc, is_name)[1:]
        tgt = doc[1:]
        for k in occurrences:
            m = occ == k
            hits[k][0] += int((pred[m] == tgt[m]).sum())
            hits[k][1] += int(m.sum())
    return {f"name@{k}": (h / n if n else float("nan")) for k, (h, n) in hits.items()} | {
        f"n@{k}": n for k, (h, n) in hits.items()}


def synthetic_documents(seed: int = 0, train_tokens: int = 60_000, test_tokens: int = 10_000):
    """(train docs, test docs, vocabulary list, is_name) from :mod:`lmmem.data.synthetic`, tokenised on
    whitespace (names are the capitalised tokens)."""
    from lmmem.data.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=seed, train_tokens=train_tokens, valid_tokens=0, test_tokens=test_tokens)
    vocab: dict[str, int] = {}
    docs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, text in generate(cfg):
        if split not in docs:
            continue
        docs[split].append(np.array([vocab.setdefault(w, len(vocab)) for w in text.split()], dtype=np.int64))
    words = list(vocab)
    is_name = np.array([w[:1].isupper() for w in words])
    return docs["train"], docs["test"], words, is_name


def bigram_predictor(train_docs: list[np.ndarray], vocab_size: int, cache_names: np.ndarray | None = None):
    """A cheap trained model: the most frequent successor of the previous token in train (a count-based
    "slow" model that cannot know a document's names). With ``cache_names`` (the ``is_name`` mask),
    after a token that precedes names in train more often than not, it predicts the name most recently
    seen in the document instead (a minimal episodic memory)."""
    # Sparse bigram counts (a V×V table would be hundreds of MB): unique (prev, next) pairs.
    pairs = np.concatenate([d[:-1] * vocab_size + d[1:] for d in train_docs if len(d) > 1])
    keys, n = np.unique(pairs, return_counts=True)
    prev, nxt = keys // vocab_size, keys % vocab_size
    order = np.lexsort((-n, prev))  # per prev, the most frequent successor first
    first = np.unique(prev[order], return_index=True)[1]
    best = np.zeros(vocab_size, dtype=np.int64)
    best[prev[order][first]] = nxt[order][first]
    name_next = None
    if cache_names is not None:
        to_name = np.bincount(prev, weights=n * cache_names[nxt], minlength=vocab_size)
        name_next = to_name * 2 > np.bincount(prev, weights=n, minlength=vocab_size)

    def predict(doc: np.ndarray) -> np.ndarray:
        pred = best[doc[:-1]].copy()
        if name_next is not None:
            recent = -1
            for i, t in enumerate(doc[:-1].tolist()):
                if cache_names[t]:
                    recent = t
                if name_next[t] and recent >= 0:
                    pred[i] = recent
        return pred

    return predict


def text_name_recall(seed: int = 0, train_tokens: int = 100_000, test_tokens: int = 40_000) -> list[dict]:
    train, test, words, is_name = synthetic_documents(seed, train_tokens, test_tokens)
    rows = []
    for label, cache in (("bigram counts", None), ("bigram + document name cache", is_name)):
        rows.append({"model": label, **name_recall(bigram_predictor(train, len(words), cache), test, is_name)})
    return rows


def main(argv=None) -> dict:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=CurriculumConfig.num_classes)
    ap.add_argument("--presentations", type=int, default=CurriculumConfig.presentations)
    ap.add_argument("--background-classes", type=int, default=CurriculumConfig.background_classes)
    ap.add_argument("--background-steps", type=int, default=CurriculumConfig.background_steps)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hebbian-rule", default=CurriculumConfig.hebbian_rule, choices=["centred", "paper"])
    ap.add_argument("--hebbian-write-norm", default=CurriculumConfig.hebbian_write_norm, choices=["row", "running", "none"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4],
                    help="Adam learning rates to run every method at (the methods prefer different ones)")
    ap.add_argument("--omniglot", help="hub name or local folder/parquet of Omniglot (instead of procedural glyphs)")
    ap.add_argument("--no-text", action="store_true", help="skip the synthetic-text name-recall table")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these convs are tiny, and on a shared machine more threads were ~10× slower)")
    args = ap.parse_args(argv)
    check_flags(vars(args))
    torch.set_num_threads(args.threads)
    cfg = CurriculumConfig(seed=args.seed, num_classes=args.classes, presentations=args.presentations,
                           background_classes=args.background_classes, background_steps=args.background_steps,
                           methods=tuple(args.methods), hebbian_rule=args.hebbian_rule, hebbian_write_norm=args.hebbian_write_norm)
    pools = None
    if args.omniglot:
        images, labels = load_omniglot(args.omniglot, image_size=cfg.image_size)
        pools = pools_from_dataset(images, labels, cfg)
    if pools is None:
        pools = procedural_pools(cfg)
    out = None
    for i, lr in enumerate(args.lrs):
        # kv_memory_sg has its own SGD learning rates and pixel_nn none: run them once.
        methods = cfg.methods if i == 0 else tuple(m for m in cfg.methods if m not in ("kv_memory_sg", "pixel_nn"))
        if not methods:
            continue
        res = run_curriculum(replace(cfg, lr=lr, methods=methods), pools, log=lambda s, lr=lr: print(f"lr={lr:g} {s}", flush=True))
        for r in res["rows"]:
            r["lr"] = {"kv_memory_sg": f"sgd {cfg.sg_fast_lr:g}/{cfg.sg_slow_lr:g}", "pixel_nn": "-"}.get(r["method"], lr)
        if out is None:
            out = res
            out["config"]["lr"] = list(args.lrs)
        else:
            out["rows"] += res["rows"]
    out["data"] = args.omniglot or "procedural glyphs"
    if not args.no_text:
        out["text_rows"] = text_name_recall(args.seed)
    return out


def cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(cli))
