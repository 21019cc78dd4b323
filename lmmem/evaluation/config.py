"""The evaluation's settings as dataclasses: what to score (:class:`EvalConfig`), with which
test-time methods (:class:`Methods`) and, with ``tune``, over which grids (:class:`TuneGrid`).
``evaluate.py``'s flags are built from these fields (lmmem.cli.add_dataclass_arguments), with the
memories' own configs (lmmem.memories: CacheConfig, MbPAConfig, KNNConfig; DynamicConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmmem.evaluation.dynamic import DEFAULT_LR_FACTORS, DynamicConfig
from lmmem.evaluation.windows import WINDOW_CONVENTIONS
from lmmem.memories.mbpa import MbPAConfig
from lmmem.memories.neural_cache import CacheConfig

DEFAULT_THETAS = (0.1, 0.3, 1.0)
DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3)
DEFAULT_KNN_LAMBDAS = (0.0, 0.05, 0.1, 0.25, 0.5)
# temperatures as multiples of the mean squared distance to the nearest neighbour on the first
# tuning batch: distances scale with the model's hidden states, a fixed temperature does not transfer
DEFAULT_KNN_TEMPERATURE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class EvalConfig:
    split: str = field(default="test", metadata={"help": "the split to score", "choices": SPLIT_NAMES})
    window: str = field(default="bptt", metadata={
        "help": "window convention: bptt (lmmem's rows of --bptt chunks), sliding (Hugging Face's strided windows; "
                "--context C), lm-eval (lm-evaluation-harness's rolling windows per document)",
        "choices": WINDOW_CONVENTIONS})
    batch_size: int = field(default=16, metadata={"help": "rows (bptt) or windows (sliding, lm-eval) scored in parallel"})
    bptt: int | None = field(default=None, metadata={
        "help": "inputs per window (default: an lmmem model's training bptt, another model's context length)"})
    context: int = field(default=0, metadata={
        "metavar": "C", "help": "sliding windows: every target is predicted from at least C tokens before its input "
                                "(windows of --bptt inputs advance by bptt − C); implies --window sliding"})
    streams: int | None = field(default=None, metadata={
        "help": "independent streams the split is cut into, each with a fresh state and its own memories (default: "
                "--batch-size for bptt, 1 otherwise); bptt: a multiple of --batch-size, scores depend on it, not on the batch"})
    max_tokens: int = field(default=0, metadata={"help": "score only the first N tokens (lm-eval: whole documents), 0 for all"})
    buckets: str = field(default="10000,1000,100", metadata={"help": "training-count edges of the frequency buckets"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    tune: bool = field(default=False, metadata={
        "help": "choose θ and the λs (--cache, --mbpa, --knn), kNN's k and temperature and the dynamic learning rate on "
                "the valid split (one pass per grid), then score the requested split once"})
    text_column: str = field(default="text", metadata={"help": "text sources: the column holding the text in .jsonl/.parquet/hub rows"})
    hub_config: str | None = field(default=None, metadata={"help": "text sources: configuration of the hub dataset"})

    def resolved_window(self) -> str:
        return "sliding" if self.context and self.window == "bptt" else self.window


@dataclass
class TuneGrid:
    thetas: tuple = DEFAULT_THETAS
    lambdas: tuple = DEFAULT_LAMBDAS  # the cache's and MbPA's λ
    lr_factors: tuple = DEFAULT_LR_FACTORS  # dynamic evaluation: multiples of --dynamic-lr
    knn_ks: tuple | None = None  # None: --knn-k and its quarter and sixteenth
    knn_temperatures: tuple | None = None  # None: DEFAULT_KNN_TEMPERATURE_FACTORS × the nearest distance
    knn_lambdas: tuple = DEFAULT_KNN_LAMBDAS


@dataclass
class KNNSpec:
    datastore: object  # a folder written by `lmmem datastore`, or an opened lmmem.memories.knn.Datastore
    config: object = None  # lmmem.memories.knn.KNNConfig (None: its defaults)


@dataclass
class Methods:
    cache: CacheConfig | None = None
    mbpa: MbPAConfig | None = None
    knn: KNNSpec | None = None
    dynamic: DynamicConfig | None = None

    @property
    def memories(self) -> tuple[str, ...]:
        return tuple(n for n in ("cache", "mbpa", "knn") if getattr(self, n) is not None)

    @property
    def any(self) -> bool:
        return bool(self.memories) or self.dynamic is not None


def is_path(x) -> bool:
    return isinstance(x, (str, Path))
