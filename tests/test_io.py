"""Reading every supported format and writing the soup back, streamed and atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FORMATS, reference_mean, tiny_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelsoups import (
    CheckpointError,
    OutputError,
    SoupError,
    average_checkpoints,
    open_checkpoint,
)
from modelsoups.io import expand_inputs


def _assert_matches(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[k], v), k


def _load_output(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return {k: v for s in sorted(shards) for k, v in load_file(path / s).items()}
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_the_saved_tensors(make_ingredients, fmt: str) -> None:
    (path,) = make_ingredients(1, fmt)
    with open_checkpoint(path) as ckpt:
        ref = tiny_state_dict(0)
        assert set(ckpt.keys()) == set(ref)
        for k, v in ref.items():
            assert torch.equal(ckpt.get(k), v), k
            assert ckpt.infos[k].shape == tuple(v.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_uniform_soup_equals_float64_reference(make_ingredients, tmp_path, fmt) -> None:
    paths = make_ingredients(4, fmt)
    out = tmp_path / "soup.safetensors"
    result = average_checkpoints(paths, out, recipe="uniform")
    ref = reference_mean([tiny_state_dict(i) for i in range(4)])
    _assert_matches(_load_output(out), ref)
    assert result.tensors == len(ref) and result.weights == [0.25] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(make_ingredients, tmp_path, dtype) -> None:
    paths = make_ingredients(3, "safetensors", dtype=dtype)
    out = tmp_path / "soup.safetensors"
    average_checkpoints(paths, out)
    got = load_file(out)
    ref = reference_mean([load_file(p) for p in paths])
    for k, v in ref.items():
        assert got[k].dtype == (dtype if v.is_floating_point() else v.dtype)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got[k].double(), v.double(), rtol=eps, atol=eps)


def test_output_dtype_can_be_chosen(make_ingredients, tmp_path) -> None:
    out = tmp_path / "soup.safetensors"
    average_checkpoints(make_ingredients(2), out, dtype=torch.bfloat16)
    got = load_file(out)
    assert got["fc.weight"].dtype == torch.bfloat16
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_sharded_in_gives_sharded_out_that_round_trips(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(3, "hf-sharded")
    out = tmp_path / "soup"
    average_checkpoints(paths, out, max_shard_size=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with open_checkpoint(out) as ckpt:
        ref = reference_mean([tiny_state_dict(i) for i in range(3)])
        _assert_matches({k: ckpt.get(k) for k in ckpt.infos}, ref)


def test_output_header_carries_provenance(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    average_checkpoints(paths, out, weights=[3, 1], recipe="weighted")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["recipe"] == "weighted"
    assert json.loads(meta["weights"]) == [0.75, 0.25]
    assert [i["path"] for i in json.loads(meta["ingredients"])] == [str(p) for p in paths]
    assert meta["modelsoups_version"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_and_reported(tmp_path, prefix: str) -> None:
    plain = tmp_path / "plain.safetensors"
    wrapped = tmp_path / "wrapped.pt"
    sd = tiny_state_dict(0)
    save_file({k: v.clone() for k, v in sd.items()}, plain)
    torch.save({prefix + k: v for k, v in sd.items()}, wrapped)
    with open_checkpoint(wrapped) as ckpt:
        assert set(ckpt.keys()) == set(sd)
        assert any("stripped prefix" in n for n in ckpt.notes)
    out = tmp_path / "soup.safetensors"
    average_checkpoints([plain, wrapped], out)
    assert torch.equal(load_file(out)["fc.weight"], sd["fc.weight"])


@pytest.mark.parametrize("nest", ["state_dict", "model", "state_dict_ema"])
def test_nested_training_checkpoint_is_found(tmp_path, nest: str) -> None:
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "optimizer_name": "adamw", nest: tiny_state_dict(0)}, path)
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.get("fc.bias"), tiny_state_dict(0)["fc.bias"])
        assert any(nest in n for n in ckpt.notes)


def test_ambiguous_nesting_asks_for_key(tmp_path) -> None:
    path = tmp_path / "train.pt"
    torch.save({"state_dict": tiny_state_dict(0), "state_dict_ema": tiny_state_dict(1)}, path)
    with pytest.raises(CheckpointError, match="--key"):
        open_checkpoint(path)
    with open_checkpoint(path, key="state_dict_ema") as ckpt:
        assert torch.equal(ckpt.get("fc.bias"), tiny_state_dict(1)["fc.bias"])


def test_pickle_tied_weights_write_without_crashing(tmp_path) -> None:
    from conftest import TinyNet

    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(TinyNet().state_dict(), paths[-1])
    out = tmp_path / "soup.safetensors"
    average_checkpoints(paths, out)
    got = load_file(out)
    assert torch.equal(got["embed.weight"], got["decoder.weight"])


def test_non_contiguous_pickle_tensors_are_written_correctly(tmp_path) -> None:
    sds = [{"w": torch.randn(4, 6).t(), "s": torch.tensor(1.5)} for _ in range(2)]
    paths = [tmp_path / f"{i}.pt" for i in range(2)]
    for sd, p in zip(sds, paths, strict=True):
        torch.save(sd, p)
    out = tmp_path / "soup.safetensors"
    average_checkpoints(paths, out)
    got = load_file(out)
    torch.testing.assert_close(got["w"], (sds[0]["w"] + sds[1]["w"]) / 2)
    assert got["s"].shape == () and float(got["s"]) == 1.5


def test_empty_and_zero_dim_tensors_survive(tmp_path) -> None:
    sd = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.0), "odd": torch.ones(3, 5, 7)}
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for p in paths:
        save_file(sd, p)
    out = tmp_path / "soup.safetensors"
    average_checkpoints(paths, out)
    got = load_file(out)
    assert got["empty"].shape == (0, 3) and float(got["scalar"]) == 2.0
    assert torch.equal(got["odd"], sd["odd"])


def test_existing_output_is_refused_unless_overwrite(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(2)
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        average_checkpoints(paths, out)
    assert out.read_bytes() == b"precious"
    average_checkpoints(paths, out, overwrite=True)
    assert "fc.weight" in load_file(out)


def test_inputs_expand_from_globs_and_list_files(make_ingredients, tmp_path) -> None:
    paths = make_ingredients(3)
    listing = tmp_path / "inputs.txt"
    listing.write_text("# runs\nrun0.safetensors\n\nrun2.safetensors\n")
    assert expand_inputs([str(tmp_path / "run*.safetensors")]) == paths
    assert expand_inputs([str(listing)]) == [paths[0], paths[2]]
    with pytest.raises(CheckpointError, match="matches no file"):
        expand_inputs([str(tmp_path / "nothing*.pt")])


def test_memory_checkpoint_reads_state_dicts_and_modules_and_names_bad_values() -> None:
    from modelsoups.io import MemoryCheckpoint

    sd = tiny_state_dict(0)
    for source in (sd, _Holder(sd)):
        ckpt = MemoryCheckpoint(source, "<mine>")
        assert ckpt.keys() == list(sd) and ckpt.format == "memory"
        assert all(ckpt.get(k) is sd[k] for k in sd)  # no copies
    with pytest.raises(SoupError, match=r"<mine>: 'w' is a str, not a tensor"):
        MemoryCheckpoint({"w": "oops"}, "<mine>")  # type: ignore[dict-item]


class _Holder(torch.nn.Module):
    """A module whose state_dict() hands back the given tensors as they are."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.sd = sd

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.sd
