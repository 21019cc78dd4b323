"""Training configuration: one flat dataclass, presets, and an argparse front end built from it.

Every field is a command-line flag (``batch_size`` → ``--batch-size``). Model fields (see
:class:`lmmem.models.ModelConfig`) live here too so that one preset sets model and optimisation
together. Resolution order: dataclass default < preset < explicit flag.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmmem.checkpoints import DEFAULT_RUN
from lmmem.cli import ArgumentParser, add_dataclass_arguments
from lmmem.errors import LmmemError
from lmmem.kernels.hebbian_rule import HEBBIAN_RULES, WRITE_MOMENTUM, WRITE_NORMS
from lmmem.models import ARCHITECTURES
from lmmem.models.config import ModelConfig
from lmmem.output_layers import OUTPUT_LAYERS
from lmmem.output_layers.base import BACKENDS
from lmmem.output_layers.hebbian_softmax import DEFAULT_LATER_LIMIT, DEFAULT_WRITE_MOMENTUM
from lmmem.validation import check_flags


OPTIMIZERS = ("adam", "rmsprop", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")
AMP_MODES = ("auto", "bf16", "none")  # auto: bf16 autocast on CUDA, none elsewhere

# Presets override TrainConfig defaults. Model shapes of `wt103-paper` are the paper's WikiText-103
# LSTM (Rae et al. 2018): one layer of 2048 units, a 512 projection, tied 512-d embeddings, full
# softmax, dropout 0.2 before the softmax. Its optimisation settings are ours (the paper does not
# give them all); N = 64 rows x 128 steps = 8,192 tokens a step.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=128, hidden_dim=256, proj_dim=128, num_layers=1, tie_weights=True, dropout=0.1,
                 output_dropout=0.1, batch_size=32, bptt=35, lr=3e-3, max_steps=2000, warmup_steps=50),
    "small": dict(embed_dim=256, hidden_dim=1024, proj_dim=256, num_layers=1, tie_weights=True, dropout=0.2,
                  output_dropout=0.2, batch_size=32, bptt=70, lr=2e-3, max_steps=5000, warmup_steps=100),
    "wt103-paper": dict(embed_dim=512, hidden_dim=2048, proj_dim=512, num_layers=1, tie_weights=True, dropout=0.1,
                        output_dropout=0.2, batch_size=64, bptt=128, lr=1e-3, clip=0.1, max_steps=100_000,
                        warmup_steps=1000, eval_interval=2000, checkpoint_interval=1000, eval_batch_size=32,
                        log_interval=100),
}


def later_limit_in_effect(softmax: str, rule: str, value: int) -> int | None:
    """What ``hebbian_T_later`` does for these settings: -1 resolved to the rule's default; None where
    it has no effect or the rule keeps its T in every pass."""
    if softmax != "hebbian" or rule != "centred":
        return None
    return DEFAULT_LATER_LIMIT[rule] if value == -1 else value


def write_momentum_in_effect(softmax: str, rule: str, value: str) -> str | None:
    """What ``hebbian_write_momentum`` does for these settings: ``"auto"`` resolved to the rule's
    default; None where the option has no effect (no Hebbian softmax, or the paper's rule)."""
    if softmax != "hebbian" or rule != "centred":
        return None
    return DEFAULT_WRITE_MOMENTUM[rule] if value == "auto" else value


@dataclass
class TrainConfig:
    # data and run
    data: str | None = field(default=None, metadata={"help": "prepared corpus folder (python -m data_prep); default: the embedded synthetic corpus"})
    out: str = field(default=DEFAULT_RUN, metadata={"help": "run folder: checkpoints, metrics.jsonl, config"})
    preset: str = field(default="tiny", metadata={"help": "model+optimisation preset (see PRESETS)", "choices": tuple(PRESETS)})
    seed: int = field(default=1234, metadata={"help": "random seed (weights, dropout)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/last.pt exactly where it stopped (reads and writes OUT)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start a new run in an OUT that already holds one, deleting its checkpoints and metrics (without it, train.py refuses)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    amp: str = field(default="auto", metadata={"help": "mixed precision: auto is bf16 autocast on CUDA, none elsewhere", "choices": AMP_MODES})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    # model
    arch: str = field(default="lstm", metadata={"help": "model architecture", "choices": tuple(ARCHITECTURES)})
    softmax: str = field(default="full", metadata={"help": "output layer", "choices": tuple(OUTPUT_LAYERS)})
    softmax_backend: str = field(default="auto", metadata={
        "help": "softmax loss implementation: auto is the fused Triton kernel on CUDA and PyTorch elsewhere", "choices": BACKENDS})
    embed_dim: int = field(default=128, metadata={"help": "embedding size"})
    hidden_dim: int = field(default=256, metadata={"help": "LSTM units (transformer: feed-forward width)"})
    num_layers: int = field(default=1, metadata={"help": "layers"})
    proj_dim: int = field(default=128, metadata={"help": "LSTM output projection, 0 for none"})
    num_heads: int = field(default=4, metadata={"help": "transformer attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and between layers"})
    output_dropout: float = field(default=0.1, metadata={"help": "dropout on the activations fed to the softmax"})
    tie_weights: bool = field(default=True, metadata={"help": "tie input embeddings and softmax weights"})
    hebbian_gamma: float = field(default=0.01, metadata={"help": "Hebbian softmax: minimum mixing rate gamma"})
    hebbian_T: int = field(default=-1, metadata={
        "help": "Hebbian softmax: smoothing limit T (occurrences after which only gradients train a row); "
                "-1: the rule's default (centred 100, paper 500; the centred rule's earlier default was 500)"})
    hebbian_rescale: bool = field(default=False, metadata={"help": "Hebbian softmax, --hebbian-rule paper only: scale the mean activation to the row's norm before mixing"})
    hebbian_rule: str = field(default="centred", metadata={
        "help": "Hebbian softmax update rule: centred (the default) writes h̄ minus the running mean of the activations, orthogonally "
                "to it, keeping the row's own component along it; paper is Rae et al. 2018 exactly: mix h̄ itself", "choices": HEBBIAN_RULES})
    hebbian_write_norm: str = field(default="running", metadata={
        "help": "Hebbian softmax, centred rule: norm of the written part: running is a running token-weighted mean of the rows' norms, "
                "row the row's own, none leaves it", "choices": WRITE_NORMS})
    hebbian_mean_decay: float = field(default=0.99, metadata={"help": "Hebbian softmax, centred rule: decay of the running mean of the activations"})
    hebbian_write_momentum: str = field(default="auto", metadata={
        "help": "Hebbian softmax, centred rule: scale multiplies the optimizer's momentum of each written row by 1 - lambda "
                "(the momentum came from gradients on the part of the row the write replaced); keep leaves it; auto: the rule's default",
        "choices": ("auto", *WRITE_MOMENTUM)})
    hebbian_T_later: int = field(default=-1, metadata={
        "help": "Hebbian softmax, centred rule: the smoothing limit from the second pass over the training data on "
                "(a variant; 0: no writes after the first pass); -1: the rule's default, --hebbian-T in every pass"})
    hebbian_start_step: int = field(default=-1, metadata={
        "help": "Hebbian softmax: optimizer steps before the rule starts writing rows (counts and running statistics still advance); "
                "-1: the rule's default (centred 50, paper 0)"})
    # optimisation
    batch_size: int = field(default=32, metadata={"help": "global batch (rows of text), split across processes"})
    bptt: int = field(default=35, metadata={"help": "truncated-BPTT length (tokens per row per step)"})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    momentum: float = field(default=0.0, metadata={"help": "SGD/RMSProp momentum"})
    lr_schedule: str = field(default="cosine", metadata={"help": "after the warm-up: constant, or cosine / linear decay to --min-lr-ratio at --max-steps", "choices": LR_SCHEDULES})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr for cosine and linear"})
    clip: float = field(default=0.25, metadata={"help": "gradient-norm clipping, 0 for none"})
    max_steps: int = field(default=2000, metadata={"help": "stop after this many optimizer steps"})
    max_epochs: int = field(default=0, metadata={"help": "stop after this many epochs, 0 for no limit"})
    time_budget: float = field(default=0.0, metadata={"help": "stop (and save) after this many minutes, 0 for none"})
    # logging and checkpoints
    log_interval: int = field(default=50, metadata={"help": "steps between log lines (and NaN checks)"})
    eval_interval: int = field(default=200, metadata={"help": "steps between validations (and best.pt updates), 0 for end only"})
    eval_tokens: int = field(default=0, metadata={"help": "validate on the first N tokens of the valid split only, 0 for all"})
    eval_batch_size: int = field(default=16, metadata={"help": "rows per validation batch"})
    checkpoint_interval: int = field(default=200, metadata={"help": "steps between last.pt saves"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    tensorboard: bool = field(default=False, metadata={"help": "also log metrics.jsonl's numbers to OUT/tensorboard (needs the tensorboard package)"})

    def model_config(self, vocab_size: int) -> ModelConfig:
        softmax_options: dict[str, Any] = {}
        if self.softmax == "hebbian":
            softmax_options = {"gamma": self.hebbian_gamma, "smoothing_limit": self.hebbian_T, "rule": self.hebbian_rule,
                               "start_step": None if self.hebbian_start_step < 0 else self.hebbian_start_step}
            if self.hebbian_rule == "paper":
                softmax_options["rescale"] = self.hebbian_rescale
            else:
                softmax_options.update(write_norm=self.hebbian_write_norm, mean_decay=self.hebbian_mean_decay,
                                       # resolved here, so a saved run keeps it when the default changes
                                       write_momentum=write_momentum_in_effect(self.softmax, self.hebbian_rule, self.hebbian_write_momentum),
                                       later_limit=later_limit_in_effect(self.softmax, self.hebbian_rule, self.hebbian_T_later))
        return ModelConfig(
            arch=self.arch,
            vocab_size=vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            proj_dim=self.proj_dim if self.arch == "lstm" else 0,
            dropout=self.dropout,
            output_dropout=self.output_dropout,
            tie_weights=self.tie_weights,
            num_heads=self.num_heads,
            context=self.bptt,
            softmax=self.softmax,
            softmax_options=softmax_options,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser(description: str = "Train a word-level language model.") -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    # every flag defaults to None = "not given": the preset (or the dataclass default) decides
    add_dataclass_arguments(parser, TrainConfig, defaults_from_class=False)
    return parser


def config_from_args(args: argparse.Namespace | dict) -> TrainConfig:
    given = {k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else args).items() if v is not None}
    preset_name = given.get("preset", TrainConfig.preset)
    if preset_name not in PRESETS:
        raise LmmemError(f"unknown --preset {preset_name!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[preset_name], **given}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise LmmemError(f"unknown training options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """One line naming the fix for a value no run can use: a choice outside its field's choices
    (the same constants the flags offer), a contradiction, or a number outside its rule."""
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            names = [str(c) for c in choices]
            raise LmmemError(f"--{f.name.replace('_', '-')} must be {', '.join(names[:-1])} or {names[-1]}, not {value!r}")
    checks = [
        (not (cfg.resume and cfg.overwrite), "--resume continues the run in --out and --overwrite replaces it: give one of them"),
        (not (cfg.hebbian_rescale and cfg.hebbian_rule != "paper"),
         "--hebbian-rescale applies to --hebbian-rule paper only; the centred rule sets the written norm with --hebbian-write-norm"),
    ]
    for ok, message in checks:
        if not ok:
            raise LmmemError(message)
    check_flags(cfg.to_dict())  # every numeric flag, with its reason (lmmem.validation)


def config_value(key: str, value):
    """A TrainConfig field's value from the text of a ``KEY=VALUE`` pair (the experiment runners'
    ``--train-args`` and variants): ``bool`` (1/true/yes), ``int``, ``float``, or the text itself.
    Values that are not text, and unknown keys, pass through (config_from_args refuses those)."""
    if not isinstance(value, str):
        return value
    kind = str({f.name: f.type for f in fields(TrainConfig)}.get(key, "str"))
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value
