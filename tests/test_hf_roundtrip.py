"""Hugging Face round trip: soups of `save_pretrained` folders load back with `from_pretrained`.

Tiny BERT and GPT-2 configs are built here (no downloads). Each ingredient is the same
randomly initialised model plus its own small noise, saved with `save_pretrained`; `soup
uniform` averages the folders; the output must load with `AutoModel*.from_pretrained` and
give the same outputs as a model into which the averaged state dict was loaded by hand.
GPT-2's LM head is tied to its token embedding: `save_pretrained` stores it once, and the
soup must keep it tied (one tensor in, one tensor out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from modelsoups.cli import main  # noqa: E402

N = 3


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _ingredients(build: Callable[[], torch.nn.Module], root: Path, **save: object) -> list[Path]:
    """N folders: one base model, each run with its own noise (same basin, different runs)."""
    paths = []
    for i in range(N):
        torch.manual_seed(0)
        model = build().eval()
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        folder = root / f"run{i}"
        model.save_pretrained(folder, **save)
        paths.append(folder)
    return paths


def _by_hand(folders: list[Path]) -> dict[str, torch.Tensor]:
    """Average the saved weights in float64, the way a user would without modelsoups."""
    sds = []
    for f in folders:
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(f.glob("*.safetensors")):
            sd.update(load_file(shard))
        sds.append(sd)
    return {
        k: (sum(s[k].double() for s in sds) / len(sds)).to(v.dtype) if v.is_floating_point() else v
        for k, v in sds[0].items()
    }


def _tokens() -> torch.Tensor:
    return torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_bert_soup_loads_with_automodel(tmp_path: Path, sharded: bool) -> None:
    save = {"max_shard_size": "20KB"} if sharded else {}
    folders = _ingredients(_bert, tmp_path, **save)
    if sharded:
        assert (folders[0] / "model.safetensors.index.json").is_file()
    out = tmp_path / "soup"
    extra = ["--max-shard-size", "20KB"] if sharded else []
    assert main(["uniform", *map(str, folders), "-o", str(out), "-q", *extra]) == 0

    loaded = transformers.AutoModel.from_pretrained(out).eval()
    assert type(loaded).__name__ == "BertModel"
    manual = _bert().eval()
    missing, unexpected = manual.load_state_dict(_by_hand(folders), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    ids = _tokens()
    with torch.no_grad():
        got, want = loaded(ids).last_hidden_state, manual(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_gpt2_tied_embeddings_round_trip(tmp_path: Path) -> None:
    folders = _ingredients(_gpt2, tmp_path)
    saved = load_file(folders[0] / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: stored once, as the token embedding
    out = tmp_path / "soup"
    assert main(["uniform", *map(str, folders), "-o", str(out), "-q"]) == 0
    assert sorted(load_file(out / "model.safetensors")) == sorted(saved)
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    manual = _gpt2().eval()
    manual.load_state_dict(_by_hand(folders), strict=False)
    assert manual.lm_head.weight.data_ptr() == manual.transformer.wte.weight.data_ptr()

    ids = _tokens()
    with torch.no_grad():
        got, want = loaded(ids).logits, manual(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and the soup really is new weights, not a copy of one ingredient
    first = load_file(folders[0] / "model.safetensors")["transformer.wte.weight"]
    assert not torch.equal(loaded.transformer.wte.weight.detach(), first)
