"""Every numeric command-line flag of every CLI, checked in one place, with the reason.

``RULES`` maps an argparse ``dest`` (``mbpa_k`` for ``--mbpa-k``) to a :class:`Rule`; a CLI calls
:func:`check_flags` with its parsed arguments (or a config's fields). The same flag has the same
meaning, hence the same rule, in every CLI that has it. ``tests/test_safety.py`` walks every
parser and fails for a numeric flag that has no rule here: a new flag needs one line below.
``CROSS_RULES`` relate two flags (``--mbpa-k`` at most ``--mbpa-memory``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lmmem.errors import LmmemError


@dataclass(frozen=True)
class Rule:
    lo: float | None = None  # bound, inclusive unless lo_open
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # the reason, shown to the user

    def violates(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False  # not numeric here (e.g. a choice string): argparse checks it
        if isinstance(v, float) and not math.isfinite(v):
            return True
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return True
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return True
        return False

    def expected(self) -> str:
        if self.lo == 0 and self.lo_open and self.hi is None:
            return "a positive number"
        if self.lo == 1 and self.hi is None:
            return "a positive whole number"
        if self.lo == 0 and not self.lo_open and self.hi is None:
            return "a number >= 0"
        if self.lo is None and self.hi is None:
            return "a finite number"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"in {left}{lo}, {hi}{right}"


def positive(why: str) -> Rule:  # > 0 (int flags: >= 1)
    return Rule(lo=0, lo_open=True, why=why)


def at_least_one(why: str) -> Rule:
    return Rule(lo=1, why=why)


def non_negative(why: str) -> Rule:
    return Rule(lo=0, why=why)


def finite(why: str) -> Rule:
    return Rule(why=why)


def unit_interval(why: str, *, hi_open: bool = False) -> Rule:
    return Rule(lo=0, hi=1, hi_open=hi_open, why=why)


RULES: dict[str, Rule] = {
    # train.py: model
    "embed_dim": at_least_one("the embedding needs at least one dimension"),
    "hidden_dim": at_least_one("a layer needs at least one unit"),
    "num_layers": at_least_one("the model needs at least one layer"),
    "proj_dim": non_negative("0 means no projection"),
    "num_heads": at_least_one("attention needs at least one head"),
    "dropout": unit_interval("a dropout probability", hi_open=True),
    "output_dropout": unit_interval("a dropout probability", hi_open=True),
    "hebbian_gamma": unit_interval("the Hebbian mixing rate is a fraction of the row that is replaced"),
    "hebbian_T": Rule(lo=-1, why="the smoothing limit counts occurrences; 0: the rows learn from gradients only; -1: the rule's default"),
    "hebbian_T_later": Rule(lo=-1, why="the later passes' smoothing limit counts occurrences; 0: no writes after the first pass; -1: the rule's default"),
    "hebbian_mean_decay": unit_interval("the running mean's decay per step", hi_open=True),
    "hebbian_start_step": Rule(lo=-1, why="optimizer steps before the rule starts; -1: the rule's default"),
    # train.py: optimisation
    "seed": non_negative("seeds are non-negative integers"),
    "batch_size": at_least_one("at least one row of text per step"),
    "bptt": at_least_one("at least one token per row per step"),
    "lr": positive("a learning rate of 0 or less does not train"),
    "weight_decay": non_negative("negative weight decay pushes weights up without bound"),
    "momentum": unit_interval("momentum >= 1 never forgets a gradient", hi_open=True),
    "warmup_steps": non_negative("0 means no warm-up"),
    "min_lr_ratio": unit_interval("the final lr is a fraction of the peak lr"),
    "clip": non_negative("0 means no clipping; a negative norm cannot be reached"),
    "max_steps": at_least_one("train at least one step"),
    "max_epochs": non_negative("0 means no limit"),
    "time_budget": non_negative("minutes; 0 means no limit"),
    "log_interval": at_least_one("steps between log lines"),
    "eval_interval": non_negative("0 means validate at the end only"),
    "eval_tokens": non_negative("0 means the whole valid split"),
    "eval_batch_size": at_least_one("at least one row per validation batch"),
    "checkpoint_interval": at_least_one("steps between checkpoints"),
    # evaluate.py
    "max_tokens": non_negative("0 means every token of the split"),
    "context": non_negative("tokens of context for the sliding window; 0 means independent windows"),
    "stat_batches": at_least_one("the RMS rule needs gradient statistics from at least one batch"),
    "sgd_lrs": positive("a learning rate of 0 or less does not adapt"),
    "rms_lrs": positive("a learning rate of 0 or less does not adapt"),
    "rms_eps": positive("ε keeps the RMS normaliser away from 0"),
    "decay": non_negative("the decay towards the trained weights"),
    "streams": at_least_one("at least one stream"),
    "cache_window": at_least_one("the cache holds at least one pair"),
    "cache_theta": finite("θ scales the cache's dot products (a NaN would make every score NaN)"),
    "cache_lambda": unit_interval("an interpolation weight"),
    "mbpa_k": at_least_one("at least one neighbour"),
    "mbpa_steps": non_negative("0 means no adaptation"),
    "mbpa_lr": non_negative("the adaptation step size"),
    "mbpa_alpha": non_negative("the pull towards the trained weights"),
    "mbpa_eps": positive("ε keeps the kernel 1/(ε + d²) finite at distance 0"),
    "mbpa_memory": at_least_one("the memory holds at least one pair"),
    "mbpa_lambda": unit_interval("an interpolation weight"),
    "mbpa_vocab": non_negative("0 means every output row (exact MbPA)"),
    "mbpa_train_pairs": non_negative("0 means an empty memory at the start"),
    "dynamic_lr": non_negative("the dynamic-evaluation step size"),
    "dynamic_decay": non_negative("the decay towards the trained weights"),
    "dynamic_segment": at_least_one("at least one token per update"),
    "dynamic_eps": positive("ε keeps the RMS normaliser away from 0"),
    "dynamic_stat_batches": at_least_one("the RMS rule needs gradient statistics from at least one batch"),
    "mbpa_max_elements": non_negative("0 means chosen by device"),
    "knn_k": at_least_one("at least one neighbour"),
    "knn_temperature": positive("p_kNN ∝ exp(−d / T): a temperature of 0 or less is not a distribution"),
    "knn_lambda": unit_interval("an interpolation weight"),
    "knn_nprobe": at_least_one("at least one inverted list is probed"),
    "knn_rerank": at_least_one("1 means no re-ranking"),
    # python -m data_prep (its argparse types parse "1,000,000"; the rules here are the same bounds)
    "min_count": at_least_one("a word seen 0 times is not in the text"),
    "max_vocab": at_least_one("the vocabulary holds at least the special tokens"),
    "vocab_size": at_least_one("the SentencePiece vocabulary size"),
    "spm_sentences": at_least_one("SentencePiece needs at least one sentence to train on"),
    "max_line_chars": at_least_one("bytes a line may hold"),
    "workers": at_least_one("at least one tokeniser process"),
    "train_tokens": at_least_one("every split needs text"),
    "valid_tokens": at_least_one("every split needs text"),
    "test_tokens": at_least_one("every split needs text"),
    "valid_fraction": unit_interval("a share of the documents", hi_open=True),
    "test_fraction": unit_interval("a share of the documents", hi_open=True),
    "min_valid_books": at_least_one("valid holds at least one book (1: the fraction alone decides)"),
    "holdout_fraction": unit_interval("a share of the documents", hi_open=True),
    # experiments
    "lrs": positive("a learning rate of 0 or less does not adapt"),
    "alphas": non_negative("the pull towards the trained weights"),
    "lambdas": unit_interval("an interpolation weight"),
    "thetas": finite("θ scales the cache's dot products"),
    "eps": positive("ε keeps the kernel 1/(ε + d²) finite at distance 0"),
    "seeds": non_negative("seeds are non-negative integers"),
    "classes": at_least_one("at least one class"),
    "presentations": at_least_one("at least one presentation"),
    "background_classes": non_negative("0 means none"),
    "background_steps": non_negative("0 means none"),
    "threads": at_least_one("at least one thread"),
    "margin": non_negative("nats a variant's training loss may rise above the full softmax's"),
    "branch_points": at_least_one("the trunk is trained at least one step before a branch"),
    "branch_steps": at_least_one("a branch trains at least one step"),
    "settle": non_negative("0 means the endpoint counts from the branch's first step"),
    "rare_below": at_least_one("a rare word has fewer than this many training occurrences"),
    "frequent_from": at_least_one("a frequent word has at least this many training occurrences"),
    "bootstrap": at_least_one("at least one bootstrap resample"),
    "passes": at_least_one("train at least one pass over the training split"),
    "eval_every": non_negative("steps between validations while training; 0 means none"),
}

# (flag a, flag b, holds(a, b), message): checked when both are given.
CROSS_RULES: list[tuple[str, str, Callable[[float, float], bool], str]] = [
    ("mbpa_k", "mbpa_memory", lambda k, m: k <= m,
     "--mbpa-k {a} is larger than --mbpa-memory {b}: MbPA cannot find more neighbours than the memory holds; lower --mbpa-k"),
    ("mbpa_train_pairs", "mbpa_memory", lambda t, m: t <= m,
     "--mbpa-train-pairs {a} is larger than --mbpa-memory {b}; lower it or enlarge the memory"),
]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(values: Mapping[str, object], *, only: set[str] | None = None) -> None:
    """Raise :class:`LmmemError` for the first value that breaks its rule (None = not given).
    Lists (``nargs='+'``) are checked element by element."""
    for dest, value in values.items():
        rule = RULES.get(dest)
        if rule is None or value is None or (only is not None and dest not in only):
            continue
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if rule.violates(v):
                raise LmmemError(f"{_flag(dest)} {v} is not allowed: expected {rule.expected()} ({rule.why})")
    for a, b, holds, message in CROSS_RULES:
        va, vb = values.get(a), values.get(b)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not holds(va, vb):
            raise LmmemError(message.format(a=va, b=vb))
