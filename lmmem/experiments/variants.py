"""How the experiment runners name training settings on their command lines.

* a *variant* ``LABEL[:key=value,...]`` (``--variants``): a label and TrainConfig fields that differ
  from the runner's base settings (``hebbian``; ``h-T100:softmax=hebbian,hebbian_T=100``);
* ``--train-args "KEY=VALUE KEY=VALUE"``: TrainConfig fields for every run.

Values stay text here; :func:`lmmem.training.config.config_value` gives them the field's type.
"""

from __future__ import annotations


def parse_variant(spec: str) -> tuple[str, dict]:
    """'hebbian' → ('hebbian', {'softmax': 'hebbian'}); 'h-T100:softmax=hebbian,hebbian_T=100' →
    ('h-T100', {'softmax': 'hebbian', 'hebbian_T': '100'}); a ``seeds=1+2`` entry limits the variant
    to those seeds (in the runners that run several)."""
    label, _, rest = spec.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    overrides.setdefault("softmax", label)
    return label, overrides


def parse_train_args(text: str) -> dict[str, str]:
    """``"preset=tiny seed=1"`` → ``{'preset': 'tiny', 'seed': '1'}``."""
    return dict(kv.split("=", 1) for kv in text.split())
