"""Built-in metrics on PEFT LoRA adapters: each candidate loaded into one `PeftModel`.

A candidate that is an adapter (`candidate.as_adapter`: an adapter folder given to
`soup eval`, or a greedy/sweep candidate of an `AdapterSpace`) is not copied into a model:
the base model is built ONCE per process (from the folder `MetricEvaluator` found: `--model`
or the adapter's `base_model_name_or_path`), its weights loaded, and wrapped in a
`peft.PeftModel`. Each candidate then only fills the LoRA factors (and `modules_to_save`
copies) of the adapter `soup-<config hash>`: the base weights are never written, so scoring
a candidate costs the adapter's size, not a model's. Needs `peft` (the `peft` extra).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..candidate import adapter_config, materialize
from ..errors import IncompatibleError, SoupError
from .model import load_config, load_into, resolve_device

if TYPE_CHECKING:
    from torch import nn

    from ..io.base import Checkpoint

__all__ = ["adapter_model", "lora_config"]

# The process's one PeftModel (at most one entry: a second base replaces the first), keyed by
# the base's folder, class, device and dtype and the stamps of the folder's files, so that a
# base rewritten in place is loaded again instead of scored with its old weights.
_BASES: dict[tuple[object, ...], Any] = {}


def adapter_model(ev: Any, candidate: Checkpoint) -> nn.Module:
    """The process's `PeftModel` over the base model of `ev` (a `MetricEvaluator`), with
    `candidate` (an adapter) as its active adapter."""
    import torch

    config = adapter_config(candidate)
    assert config is not None
    model = _peft_base(ev, candidate, config)
    name = "soup-" + hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    if name not in model.peft_config:
        model.add_adapter(name, lora_config(config))
    model.set_adapter(name)
    for other in [n for n in model.peft_config if n != name]:  # keep one adapter's memory
        model.delete_adapter(other)
    with torch.no_grad():
        import peft

        loaded = peft.set_peft_model_state_dict(model, materialize(candidate), adapter_name=name)
    missing = [k for k in getattr(loaded, "missing_keys", []) if f".{name}." in k]
    unexpected = list(getattr(loaded, "unexpected_keys", []))
    if missing or unexpected:
        raise IncompatibleError(
            f"{candidate.path}: the adapter does not fit the base model in {ev.model_dir} "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    return model.eval()


def _peft_base(ev: Any, candidate: Checkpoint, config: dict[str, Any]) -> Any:
    """The base model of `ev`, weights loaded, wrapped in a `PeftModel` (built once, and
    again only for another base or this one rewritten)."""

    from ..io import open_checkpoint
    from ..io.files import stamps

    try:
        import peft
        import transformers
    except ImportError as e:
        raise SoupError(f"scoring PEFT adapters in process needs peft ({e})") from None
    if ev.model_dir is None:
        ev.check(candidate)
    folder, auto_class = Path(ev.model_dir or ""), ev.metric.auto_class
    device, dtype = resolve_device(ev.device), ev.settings.torch_dtype
    key = (str(folder.resolve()), auto_class, str(device), str(dtype), *stamps(folder).items())
    if key not in _BASES:
        _BASES.clear()  # free the last base before the next is built
        base = getattr(transformers, auto_class).from_config(load_config(folder, auto_class))
        with open_checkpoint(folder) as weights:
            load_into(base, weights, folder)
        base = base.to(device=device, dtype=dtype)
        _BASES[key] = peft.PeftModel(base, lora_config(config), adapter_name="base")
    return _BASES[key]


def lora_config(config: dict[str, Any]) -> Any:
    """A `peft.LoraConfig` from an `adapter_config.json`'s content (fields PEFT does not
    know, and `peft_type`, are left out)."""
    import peft

    fields = set(peft.LoraConfig.__dataclass_fields__) - {"peft_type"}
    return peft.LoraConfig(**{k: v for k, v in config.items() if k in fields})
