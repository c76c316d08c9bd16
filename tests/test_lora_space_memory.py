"""`AdapterSpace` holds each adapter's own tensors once, never N padded copies of rank Σ rᵢ.

The padded tensors (A stacked to rank R = Σ rᵢ, B zero-padded to R columns) are built by
`get`, one key at a time, when a recipe reads them. Counted here without timing: the bytes
of every tensor reachable from the space's ingredients equal the adapters' own float32
bytes (linear in N), while N padded state dicts would hold N·R columns of B per module.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modelsoups as ms

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}


def write_adapters(root: Path, ranks: list[int]) -> list[Path]:
    """Adapters in PEFT's file format: random A (r × k), B (d × r), α = 2r, one lm_head."""
    out = []
    for i, r in enumerate(ranks):
        g = torch.Generator().manual_seed(i)
        tensors = {"base_model.model.lm_head.weight": torch.randn(8, 16, generator=g)}
        for m, (d, k) in MODULES.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, k, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d, r, generator=g)
        folder = root / f"run{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "base_model_name_or_path": "base", "r": r,
                  "lora_alpha": 2 * r, "target_modules": ["q_proj", "down_proj"],
                  "modules_to_save": ["lm_head"], "fan_in_fan_out": False}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out.append(folder)
    return out


def held_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (attributes, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return held_bytes(vars(obj), seen)
    return 0


@pytest.mark.parametrize("n", [2, 8])
def test_space_holds_the_adapters_own_tensors_once_whatever_n(tmp_path: Path, n: int) -> None:
    ranks = [4 + 2 * (i % 3) for i in range(n)]
    space = ms.AdapterSpace(write_adapters(tmp_path, ranks))
    own = sum(4 * (r * k + d * r) for r in ranks for d, k in MODULES.values()) + n * 8 * 16 * 4
    R = sum(ranks)
    padded = n * sum(4 * (R * k + d * R) for d, k in MODULES.values()) + n * 8 * 16 * 4
    seen: set[int] = set()
    held = sum(held_bytes(c, seen) for c in space.ingredients)
    assert held == own, f"held {held} bytes, the adapters are {own}, padded copies {padded}"
    assert padded > 1.5 * own  # what the test rules out is measurable at both sizes


def test_each_key_read_is_the_padded_tensor_of_the_shared_rank_space(tmp_path: Path) -> None:
    """A stacked over the adapters, B = [0 | sᵢ·Bᵢ | 0] at its own columns, lm_head as is;
    the ingredient also survives pickling into a worker process unchanged."""
    from safetensors.torch import load_file

    ranks = [4, 6, 2]
    runs = write_adapters(tmp_path, ranks)
    space = ms.AdapterSpace(runs)
    files = [load_file(r / "adapter_model.safetensors") for r in runs]
    for i, ing in enumerate(space.ingredients):
        copy = pickle.loads(pickle.dumps(ing))
        for m in MODULES:
            a_key, b_key = (f"base_model.model.{m}.lora_{x}.weight" for x in "AB")
            want_a = torch.cat([f[a_key] for f in files])
            want_b = torch.zeros(files[0][b_key].shape[0], sum(ranks))
            start = sum(ranks[:i])
            want_b[:, start : start + ranks[i]] = files[i][b_key] * 2.0  # α/r = 2
            for c in (ing, copy):
                assert torch.equal(c.get(a_key), want_a) and torch.equal(c.get(b_key), want_b)
                assert c.infos[b_key].shape == tuple(want_b.shape)
        lm = "base_model.model.lm_head.weight"
        assert torch.equal(ing.get(lm), files[i][lm]) and torch.equal(copy.get(lm), files[i][lm])
