"""Put an lmmem softmax in place of the output head of a Hugging Face ``*ForCausalLM``.

How it works (per model instance; no class or library is patched):

* the model's ``nn.Linear`` head is replaced by a :mod:`lmmem.hf.heads` layer that keeps the
  *same* weight (and bias) parameters, so a pretrained head becomes the layer's initial rows and tied
  input embeddings stay tied (it is the same ``nn.Parameter``);
* the instance's ``forward`` is wrapped. Without labels, in eval mode, or under ``torch.no_grad()``
  it is the model's own forward (the head returns logits, ``logits_to_keep`` works, ``generate()``
  is unchanged). In training with ``labels`` it runs the model's own forward with the head in
  capture mode and ``logits_to_keep=0``, so the model hands back the final activations instead of
  logits, and the loss is the layer's ``loss`` on HF's shifted labels (``-100`` ignored,
  ``shift_labels`` and the Trainer's ``num_items_in_batch`` honoured). The output then has
  ``logits=None``.

The model's ``resize_token_embeddings`` is wrapped too (:mod:`lmmem.hf.resize`): it keeps the lmmem
head, its counts and rule state, with added rows initialised as transformers initialises them and
counted as never seen. The head is recorded in ``model.config`` (so ``save_pretrained`` writes it to
``config.json``); the model gets its own copy of the config first, since configs are shared objects
(a stock baseline built from the same config must stay stock).

Reusing the model's own forward (rather than re-implementing it around ``model.model``) keeps every
architecture's argument handling, caches and masks as they are. What it requires is that the logits
are ``lm_head(last hidden state)`` with nothing after the head (no soft-capping or scaling of the
logits); :func:`apply_hebbian_softmax` checks that with a 3-token probe and refuses otherwise.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmmem.errors import LmmemError
from lmmem.hf.heads import HEADS, head_kind
from lmmem.hf.resize import install_method, wrap_resize
from lmmem.output_layers.base import IGNORE_INDEX, OutputLayer

CONFIG_KEY = "lmmem_head"  # in model.config (and so in config.json): which layer, with which options
# Attributes of HF configs that post-process the logits after the head (Gemma 2/3, Cohere, Granite):
# the fused loss would skip them, so such models are refused with a clear message.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_RUNTIME_OPTIONS = ("backend",)  # layer options that are a run-time choice, not saved in config.json


def apply_hebbian_softmax(model: nn.Module, *, trainer=None, loss_options: dict | None = None, verify: bool = True,
                          **layer_options) -> nn.Module:
    """Replace the ``nn.Linear`` output head of a Hugging Face causal LM by a
    :class:`~lmmem.output_layers.HebbianSoftmax` (``layer_options``: ``gamma``, ``smoothing_limit``,
    ``rescale``, ``backend``, ...), in place; returns ``model``.

    ``model(input_ids, labels=...)`` in training then trains through the layer's fused loss,
    ``model(input_ids)`` still returns logits and ``generate()`` is unchanged. The Hebbian update must
    run after every optimizer step: give ``trainer=`` (a ``transformers.Trainer``) to add
    :class:`~lmmem.hf.HebbianSoftmaxCallback` to it, or call :func:`lmmem.hf.attach_to_optimizer`
    (``model, optimizer``) in your own loop. ``loss_options`` are passed to every ``layer.loss`` call.
    ``verify`` runs a 3-token probe to check that the model's logits are ``lm_head(hidden)``.
    """
    _warn_if_saved_head_is_dropped(model)
    _apply(model, "hebbian", layer_options, dict(loss_options or {}), verify)
    if trainer is not None:
        from lmmem.hf.callback import HebbianSoftmaxCallback

        if not any(isinstance(cb, HebbianSoftmaxCallback) for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(HebbianSoftmaxCallback())
    return model


def apply_fused_softmax(model: nn.Module, *, loss_options: dict | None = None, verify: bool = True, **layer_options) -> nn.Module:
    """As :func:`apply_hebbian_softmax` with the plain softmax (:class:`~lmmem.output_layers.FullSoftmax`):
    the fused linear + cross-entropy loss in training, no update rule."""
    _warn_if_saved_head_is_dropped(model)
    return _apply(model, "full", layer_options, dict(loss_options or {}), verify)


def _warn_if_saved_head_is_dropped(model: nn.Module) -> None:
    spec = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if spec is not None and head_kind(model.get_output_embeddings()) is None:
        warnings.warn(f"this model was saved with an lmmem {spec.get('layer')} head, but loaded with the stock one: applying "
                      "a new head starts its state (the Hebbian counts) from zero. Load it with lmmem.hf.from_pretrained(path), "
                      "or call lmmem.hf.load_head_state(model, path) after applying", stacklevel=3)


def lmmem_head(model: nn.Module) -> OutputLayer | None:
    """The lmmem layer serving as ``model``'s output head, or None."""
    head = model.get_output_embeddings()
    return head if head_kind(head) is not None else None


# -- replacing the head ---------------------------------------------------------------------------
def _head_path(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return name
    raise LmmemError(f"{type(model).__name__}.get_output_embeddings() is not a submodule of the model; "
                     "lmmem.hf supports *ForCausalLM models whose head is an attribute such as lm_head")


def _apply(model: nn.Module, kind: str, layer_options: dict, loss_options: dict, verify: bool) -> nn.Module:
    if not hasattr(model, "get_output_embeddings"):
        raise LmmemError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; for your own model use "
                         "lmmem.output_layers.HebbianSoftmax and its loss(hidden, targets) directly")
    old = model.get_output_embeddings()
    if head_kind(old) is not None:
        raise LmmemError(f"{type(model).__name__} already has an lmmem head ({type(old).__name__}); apply once per model "
                         "(load saved models with lmmem.hf.from_pretrained, which re-applies it)")
    if not isinstance(old, nn.Linear):
        raise LmmemError(f"{type(model).__name__}'s output head is {type(old).__name__}, not nn.Linear; lmmem.hf replaces "
                         "the linear head of *ForCausalLM models (GPT-2, Llama, Mistral, Qwen, ...)")
    config = getattr(model, "config", None)
    for attr in _LOGIT_POSTPROCESSING:
        if getattr(config, attr, None) not in (None, 0, 1):
            raise LmmemError(f"{type(model).__name__} post-processes its logits ({attr}={getattr(config, attr)}), which the "
                             "fused loss of lmmem.hf does not reproduce; use the model's own head")
    cls = HEADS[kind]
    _check_loss_options(cls, loss_options)
    # Built on the meta device: its own V × D initial weight is never allocated, the old head's
    # parameters are put in (same Parameter objects: ties and optimizer references stay valid).
    try:
        with torch.device("meta"):
            head = cls(old.in_features, old.out_features, bias=old.bias is not None, **layer_options)
    except (TypeError, ValueError) as e:
        raise LmmemError(f"{cls.__name__}: {e}") from None
    head.weight = old.weight
    head.bias = old.bias
    # The layers' state buffers (Hebbian counts, ...) all start at zero (a test checks this against a
    # layer built the ordinary way), so they are made directly on the weight's device.
    for name, buf in list(head.named_buffers(recurse=False)):
        setattr(head, name, torch.zeros(buf.shape, dtype=buf.dtype, device=old.weight.device))
    head.train(old.training)
    path = _head_path(model, old)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    put_head = functools.partial(setattr, parent, attr)
    put_head(head)
    unwrap_forward = _wrap_forward(model, head, loss_options)
    unwrap_resize = wrap_resize(model, head, put_head) if hasattr(model, "resize_token_embeddings") else (lambda: None)
    if verify:
        try:
            _verify_logits_are_head_of_hidden(model, head)
        except BaseException:
            # refused: leave the model exactly as it was given
            put_head(old)
            unwrap_forward()
            unwrap_resize()
            raise
    if config is not None:
        # Recorded in a private copy: a config object is often shared (a stock baseline built from the
        # same GPT2Config), and the entry would make that model save and load as an lmmem one.
        config = _own_config(model, config)
        saved = {k: v for k, v in layer_options.items() if k not in _RUNTIME_OPTIONS}
        if kind == "hebbian":  # the T in effect, so that a later change of the default does not change a saved model
            saved["smoothing_limit"] = head.smoothing_limit
            if head.rule == "centred":  # likewise what a write does to the momentum, and the later passes' T
                saved["write_momentum"] = head.write_momentum
                saved["later_limit"] = head.later_limit
        setattr(config, CONFIG_KEY, {"layer": kind, "options": saved, "loss_options": dict(loss_options)})
    return model


def _own_config(model: nn.Module, config):
    """Give ``model`` a deep copy of its ``config`` and return it. Every submodule attribute that
    referred to the config, or to one of its sub-configs (a composite model's ``text_config``), is
    pointed at the copy, so the model stays consistent with itself and the caller's object is untouched."""
    from transformers import PretrainedConfig

    memo: dict = {}
    own = copy.deepcopy(config, memo)
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig) and id(value) in memo:
                setattr(module, name, memo[id(value)])
    return own


def _check_loss_options(cls: type[OutputLayer], loss_options: dict) -> None:
    params = inspect.signature(cls.loss).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(loss_options) - set(params) - {"self"})
    if unknown:
        raise LmmemError(f"{cls.__name__}.loss takes no option {', '.join(unknown)}; it takes: "
                         f"{', '.join(n for n in params if n not in ('self', 'hidden', 'targets'))}")


# -- the forward ----------------------------------------------------------------------------------
def _wrap_forward(model: nn.Module, head: OutputLayer, loss_options: dict):
    """Install the wrapped forward described in the module docstring; returns a function that uninstalls it."""
    original = model.forward  # bound method (or an instance-level wrapper someone installed before us)
    params = inspect.signature(original).parameters
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if len(args) > 1:  # name positional arguments so that labels can be found whatever their position
            kwargs.update(zip(positional[1:], args[1:]))
            args = args[:1]
        labels = kwargs.get("labels")
        if labels is None or not model.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return _fused_loss_forward(model, original, head, keep_arg, loss_options, args, kwargs)

    return install_method(model, "forward", forward)


def _fused_loss_forward(model, original, head, keep_arg, loss_options, args, kwargs):
    labels = kwargs.pop("labels")
    return_dict = kwargs.pop("return_dict", None)
    if keep_arg is not None:
        kwargs[keep_arg] = 0  # every position is a training target
    num_items = kwargs.get("num_items_in_batch")  # stays in kwargs: the model's own forward receives it as usual
    shift_labels = kwargs.get("shift_labels")
    with head.capturing():
        out = original(*args, return_dict=True, **kwargs)
    hidden = out.logits  # the head's input: (B, T, D)
    if shift_labels is None:
        # HF's convention (ForCausalLMLoss): position t predicts labels[t + 1]; the last predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items is None:
        loss = head.loss(flat, targets, reduction="mean", ignore_index=IGNORE_INDEX, **loss_options)
    else:
        # the Trainer's gradient accumulation: sum here, divided by the tokens of the whole accumulated batch
        loss = head.loss(flat, targets, reduction="sum", ignore_index=IGNORE_INDEX, **loss_options)
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    result = type(out)(loss=loss, logits=None, **fields)
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    return result if return_dict else result.to_tuple()


@torch.no_grad()
def _verify_logits_are_head_of_hidden(model: nn.Module, head: OutputLayer) -> None:
    """The fused loss is right only if the model's logits are ``head(last hidden state)``; a 3-token
    probe in eval mode compares the two (same weights, same ops: they agree to rounding)."""
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode (a user may keep parts in eval)
    model.eval()
    try:
        device = getattr(model, "device", head.weight.device)
        ids = torch.arange(3, device=device).remainder(head.num_classes).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False, return_dict=True).logits
        with head.capturing():
            hidden = model(input_ids=ids, use_cache=False, return_dict=True).logits
        expected = head.logits(hidden)
    finally:
        for module, training in modes:
            module.training = training
    if logits.shape != expected.shape or not torch.allclose(logits.float(), expected.float(), rtol=1e-4, atol=1e-4):
        raise LmmemError(f"{type(model).__name__}'s logits are not lm_head(last hidden state) (the model transforms them after "
                         "the head), so the fused loss would train another function; keep the model's own head")


# -- saving and loading ---------------------------------------------------------------------------
def from_pretrained(path: str | os.PathLike, *model_args, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved with an lmmem head: ``model_class.from_pretrained`` (default
    ``AutoModelForCausalLM``), then the head recorded in its ``config.json`` is re-applied and its
    state (the Hebbian ``counts``) restored from the saved weights. A model saved without an lmmem
    head loads as plain ``from_pretrained`` would."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    spec = _saved_spec(path, kwargs)
    if spec is None:
        return model_class.from_pretrained(path, *model_args, **kwargs)
    head_keys = _saved_head_state_keys(path)
    with _quiet_about_keys(head_keys):
        model = model_class.from_pretrained(path, *model_args, **kwargs)
    options = dict(spec.get("options", {}))
    if spec["layer"] == "hebbian" and options.get("rule", "centred") == "centred":
        options.setdefault("write_momentum", "keep")  # saved before the option existed: trained with "keep"
    _apply(model, spec["layer"], options, spec.get("loss_options", {}), verify=False)
    load_head_state(model, path)
    return model


def _saved_spec(path, kwargs) -> dict | None:
    config = kwargs.get("config")
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs})
    spec = getattr(config, CONFIG_KEY, None)
    if spec is not None and spec.get("layer") not in HEADS:
        raise LmmemError(f"{path} was saved with lmmem head {spec.get('layer')!r}, which this lmmem does not have; "
                         f"known: {', '.join(HEADS)}")
    return spec


def _weight_files(path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise LmmemError(f"lmmem.hf.from_pretrained reads the head's state from a local folder; {path} is not one "
                         "(download it first, e.g. huggingface_hub.snapshot_download)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LmmemError(f"{path} has no .safetensors weights; save the model with save_pretrained(..., "
                         "safe_serialization=True) (the default)")
    return files


def _saved_head_state_keys(path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            keys.update(k for k in st.keys() if k.rsplit(".", 1)[-1] in _head_buffer_names())
    return keys


def _head_buffer_names() -> set[str]:
    names: set[str] = set()
    for cls in HEADS.values():
        with torch.device("meta"):
            names.update(n for n, _ in cls(1, 1).named_buffers())
    return names


def load_head_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the persistent buffers of ``model``'s lmmem head (e.g. ``counts``) from the safetensors
    weights in folder ``path`` (what ``save_pretrained`` wrote). For a model loaded with plain
    ``from_pretrained`` and re-applied by hand; :func:`from_pretrained` does all of it."""
    from safetensors import safe_open

    head = lmmem_head(model)
    if head is None:
        raise LmmemError("the model has no lmmem head; apply_hebbian_softmax(model) first")
    prefix = _head_path(model, head)
    wanted = {f"{prefix}.{name}": buf for name, buf in head.named_buffers(recurse=False) if name not in head._non_persistent_buffers_set}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in wanted.keys() & set(st.keys()):
                buf = wanted.pop(key)
                value = st.get_tensor(key)
                if value.shape != buf.shape:
                    raise LmmemError(f"{path}: {key} has shape {tuple(value.shape)}, the model's head {tuple(buf.shape)}; "
                                     "load the model with the vocabulary it was saved with")
                buf.copy_(value)
    persistent = [n for n, _ in head.named_buffers(recurse=False) if n not in head._non_persistent_buffers_set]
    if persistent and len(wanted) == len(persistent):
        raise LmmemError(f"{path} has no {', '.join(sorted(wanted))}: it was not saved from a model with this lmmem head "
                         "(save with model.save_pretrained after apply_hebbian_softmax)")
    # Some but not all found: saved by an lmmem whose layer had less state (e.g. before the centred
    # rule's running statistics); those start fresh, as HebbianSoftmax does for old checkpoints.


@contextmanager
def _quiet_about_keys(keys: set[str]):
    """Drop transformers' load report when the only keys it lists are the head's buffers, which
    from_pretrained restores right after (they are 'unexpected' only to the stock nn.Linear head)."""

    def only_ours(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if "|" in line and not line.startswith("-")]
        listed = {r[0].strip() for r in rows[1:]} if rows else set()  # rows[0] is the header
        return not (listed and listed <= keys)

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(only_ours)
    try:
        yield
    finally:
        logger.removeFilter(only_ours)
