"""Tiny Llama bases and real PEFT LoRA adapters, built for the LoRA tests.

`make_base` saves a randomly initialised 2-layer Llama with `save_pretrained`; `make_adapter`
wraps it with `peft.get_peft_model` and randomises `lora_B` (zero at initialisation, which
would make every soup trivially exact) and the `modules_to_save` copies. `reference` is
the float64 model W₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ computed from the saved files by hand, independent of
modelsoups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def make_base(path: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_adapter(
    base: Path,
    path: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    rslora: bool = False,
    seed: int = 1,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    modules_to_save: Sequence[str] | None = ("lm_head",),
    kind: str = "lora",
) -> Path:
    """A PEFT adapter of `base` saved in `path`, with random non-zero trained tensors."""
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    save = list(modules_to_save) if modules_to_save else None
    if kind == "loha":
        config: object = peft.LoHaConfig(r=r, alpha=alpha, target_modules=list(targets))
    elif kind == "lokr":
        config = peft.LoKrConfig(r=r, alpha=alpha, target_modules=list(targets))
    elif kind == "ia3":
        config = peft.IA3Config(target_modules=list(targets), feedforward_modules=[])
    elif kind == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                 target_modules=list(targets), modules_to_save=save,
                                 use_dora=kind == "dora")  # fmt: skip
    wrapped = peft.get_peft_model(model, config)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:  # lora_A, lora_B, modules_to_save copies (and DoRA's m)
                p.add_(torch.randn_like(p) * 0.1)
    wrapped.save_pretrained(path)
    return path


def scale(config: dict[str, object]) -> float:
    r, alpha = float(config["r"]), float(config["lora_alpha"])  # type: ignore[arg-type]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def reference(
    base: Path, adapters: Sequence[Path], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """float64 W₀ + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, and M₀ + Σ wᵢ·(Mᵢ − M₀) for modules_to_save tensors
    (the task-vector sum; Σ wᵢ·Mᵢ when the weights sum to 1)."""
    model = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}
    out = dict(model)
    saved: dict[str, torch.Tensor] = {}
    for w, a in zip(weights, adapters, strict=True):
        config = json.loads((a / "adapter_config.json").read_text())
        tensors = load_file(a / "adapter_model.safetensors")
        for key, t in tensors.items():
            name = key.removeprefix(PREFIX)
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
                target = name.replace(".lora_A.weight", ".weight")
                out[target] = out[target] + w * scale(config) * (b @ t.double())
            elif ".lora_B." not in key:
                delta = w * (t.double() - model[name])
                saved[name] = saved.get(name, model[name]) + delta
    out.update(saved)
    return out
