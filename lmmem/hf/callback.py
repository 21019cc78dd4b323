"""Running the Hebbian update after every optimizer step: a Trainer callback and a one-call attach."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from lmmem.errors import LmmemError
from lmmem.output_layers.base import OutputLayer, unwrap_optimizer


def output_layers(model: nn.Module) -> list[OutputLayer]:
    """Every lmmem output layer in ``model`` (a DDP/FSDP wrapper included: its modules are searched)."""
    return [m for m in model.modules() if isinstance(m, OutputLayer)]


def attach_to_optimizer(model: nn.Module, optimizer) -> list:
    """Run the update of every lmmem layer in ``model`` after every step of ``optimizer`` (a
    ``torch.optim.Optimizer``, or a wrapper of one: Accelerate's ``AcceleratedOptimizer``, an LR
    scheduler, ...). Returns the hook handles (``handle.remove()`` detaches)."""
    return [layer.attach_to_optimizer(optimizer) for layer in output_layers(model)]


class HebbianSoftmaxCallback(TrainerCallback):
    """For ``transformers.Trainer``: applies the Hebbian update of every lmmem layer in the model right
    after each optimizer step (the Trainer's ``on_optimizer_step`` event, i.e. once per accumulated
    batch, before the LR scheduler steps), and tells them at every epoch start how many passes over
    the training data are complete. Harmless for layers without a rule and if the layer is also
    attached to the optimizer (a second call finds nothing pending)."""

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        # the passes over the training data completed so far (a resumed run's too): the Hebbian rule's
        # limit changes after the first pass (HebbianSoftmax.start_pass)
        if model is not None:
            for layer in output_layers(model):
                layer.start_pass(int(state.epoch or 0))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            inner = None
            if optimizer is not None:
                try:
                    inner = unwrap_optimizer(optimizer)
                except LmmemError:  # a wrapper we cannot see into: the rule then leaves the optimizer state alone
                    inner = None
            for layer in output_layers(model):
                layer.on_optimizer_step(inner)
