"""`AdapterSpace` holds no tensor: its memory is flat in N, whatever the adapters' sizes.

The padded tensors (A stacked to rank R = Σ rᵢ, B zero-padded to R columns) are built by
`get`, one key at a time, when a recipe reads them, from the adapters' files (memory-mapped
in the process that reads: file pages, not anonymous memory). Counted here without timing:
no tensor storage is reachable from the space's ingredients, before or after every key was
read, for N up to 32, and what one ingredient pickles into a worker is metadata, whose size
does not depend on the adapters' tensor sizes. `.bin` adapters (pickles, which cannot be
mapped) are converted to private safetensors copies, removed with the space.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import modelsoups as ms

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}


def write_adapters(root: Path, ranks: list[int], width: int = 1) -> list[Path]:
    """Adapters in PEFT's file format: random A (r × k), B (d × r), α = 2r, one lm_head;
    `width` multiplies d and k."""
    out = []
    for i, r in enumerate(ranks):
        g = torch.Generator().manual_seed(i)
        tensors = {"base_model.model.lm_head.weight": torch.randn(8, 16, generator=g)}
        for m, (d, k) in MODULES.items():
            d, k = d * width, k * width
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
    """Bytes of the distinct tensor storages, numpy arrays and byte strings reachable from
    `obj` (attributes, containers). Memory maps (file pages) are not counted."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray | bytes | bytearray):
        return obj.nbytes if isinstance(obj, np.ndarray) else len(obj)
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


@pytest.mark.parametrize("n", [2, 8, 32])
def test_space_holds_no_tensor_whatever_n_even_after_every_key_was_read(
    tmp_path: Path, n: int
) -> None:
    ranks = [4 + 2 * (i % 3) for i in range(n)]
    space = ms.AdapterSpace(write_adapters(tmp_path, ranks))
    R = sum(ranks)
    padded = n * sum(4 * (R * k + d * R) for d, k in MODULES.values()) + n * 8 * 16 * 4
    assert held_bytes(space) == 0
    read = 0
    for c in space.ingredients:
        for key in c.infos:
            read += c.get(key).nbytes
    assert read == padded  # every padded tensor was built once ...
    assert held_bytes(space) == 0  # ... and none is kept


def test_what_an_ingredient_sends_to_a_worker_does_not_depend_on_tensor_sizes(
    tmp_path: Path,
) -> None:
    """Pickled (a worker's copy), an ingredient is paths, stamps, keys and scales: the same
    size for adapters 8× as wide, and linear in N only through that per-adapter metadata."""
    sizes = {}
    for width in (1, 8):
        for n in (4, 16):
            root = tmp_path / f"w{width}-n{n}"
            root.mkdir()
            space = ms.AdapterSpace(write_adapters(root, [4] * n, width=width))
            sizes[width, n] = len(pickle.dumps(space.ingredients[0]))
    per_adapter = (sizes[1, 16] - sizes[1, 4]) / 12
    assert abs(sizes[8, 4] - sizes[1, 4]) < 64 and abs(sizes[8, 16] - sizes[1, 16]) < 64
    assert per_adapter < 2000, sizes  # paths, stamps, keys: no tensor (one A is 4·r·k bytes)
    one_adapter_bytes = 8 * sum(4 * 4 * (k + d) for d, k in MODULES.values())
    assert sizes[8, 16] < 16 * one_adapter_bytes, sizes  # what holding the tensors would take


def test_bin_adapters_read_from_private_copies_removed_with_the_space(tmp_path: Path) -> None:
    """A `.bin` adapter cannot be mapped: its private safetensors copy gives the same padded
    tensors as the safetensors adapter, the space holds no tensor, and the copy's folder is
    gone once the space and its ingredients are."""
    import gc

    from safetensors.torch import load_file

    runs = write_adapters(tmp_path, [4, 6])
    bins = []
    for r in runs:
        b = tmp_path / f"{r.name}-bin"
        b.mkdir()
        torch.save(load_file(r / "adapter_model.safetensors"), b / "adapter_model.bin")
        (b / "adapter_config.json").write_text((r / "adapter_config.json").read_text())
        bins.append(b)
    want, got = ms.AdapterSpace(runs), ms.AdapterSpace([runs[0], bins[1]])
    assert held_bytes(got) == 0
    for a, b in zip(want.ingredients, got.ingredients, strict=True):
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.infos)
    (sd_want, config_want), (sd_got, config_got) = (s.adapter([0.25, 0.75]) for s in (want, got))
    assert config_got == config_want and all(torch.equal(sd_got[k], v) for k, v in sd_want.items())
    (private,) = {p.parent for p in got.ingredients[0].layout.files.paths[1:]}
    assert private.is_dir() and private not in (r.parent for r in bins)
    del got, b
    gc.collect()
    assert not private.exists()


def test_an_adapter_rewritten_after_the_space_was_built_is_refused(tmp_path: Path) -> None:
    runs = write_adapters(tmp_path, [4, 4])
    space = ms.AdapterSpace(runs)
    key = next(iter(space.keys))
    space.ingredients[0].get(key)
    space.ingredients[0].close()  # unmapped: the next read opens the file again
    file = runs[1] / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-4] + bytes(4))  # same size, other bytes, new mtime
    os.utime(file, ns=(1, 1))
    with pytest.raises(ms.SoupError) as e:
        space.ingredients[0].get(key)
    want = f"{file}: changed since the adapters were opened (it was rewritten); "
    assert str(e.value).startswith(want) and "\n" not in str(e.value)


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
