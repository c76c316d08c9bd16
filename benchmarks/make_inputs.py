"""Generate the benchmark's inputs: N perturbed copies of one Llama-shaped base model.

Each copy is an HF-style folder (``config.json`` + ``model.safetensors``) so that every
tool under test — `cat`, numpy, torch, mergekit, `soup` — reads the same bytes. Llama
rather than BERT because mergekit 0.1.5 crashes on BERT checkpoints.

Copies are cached under ``benchmarks/.cache/<size>-<dtype>/m00 .. m15``: a run that asks
for N=4 reuses the first four copies of a run that asked for N=16. A folder is complete
once its ``model.safetensors`` exists (written to a temporary name, then renamed).

Run alone:  python benchmarks/make_inputs.py --sizes 25M --dtypes fp32 --n 4
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Shape:
    """Llama hyper-parameters; the vocabulary is the same 32000 everywhere (Llama-2's)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes exactly as transformers' LlamaForCausalLM stores them."""
        h, i = self.hidden, self.intermediate
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{proj}.weight"] = (h, h)
            out[p + "mlp.gate_proj.weight"] = (i, h)
            out[p + "mlp.up_proj.weight"] = (i, h)
            out[p + "mlp.down_proj.weight"] = (h, i)
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)  # untied, as in Llama-2
        return out

    def n_params(self) -> int:
        total = 0
        for shape in self.tensors().values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def largest_tensor_numel(self) -> int:
        return max(_numel(s) for s in self.tensors().values())

    def config(self, dtype: str) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": TORCH_DTYPE[dtype],
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# Sizes are named by their approximate parameter count (exact counts in the results).
SIZES: dict[str, Shape] = {
    "tiny": Shape(hidden=64, intermediate=172, layers=2, heads=4, vocab=1000),  # ~0.2M
    "25M": Shape(hidden=256, intermediate=688, layers=11, heads=8),  # 25.1M
    "110M": Shape(hidden=768, intermediate=2048, layers=9, heads=12),  # 112.9M
    "440M": Shape(hidden=1024, intermediate=2816, layers=29, heads=16),  # 438.5M
    "250M": Shape(hidden=1024, intermediate=2816, layers=14, heads=16),  # 245.4M (bench_scale)
    "1B": Shape(hidden=2048, intermediate=5504, layers=16, heads=32),  # 941.4M (bench_scale)
}
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BYTES_PER = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_dir(size: str, dtype: str, index: int, root: Path = CACHE) -> Path:
    return root / f"{size}-{dtype}" / f"m{index:02d}"


def ensure_models(
    size: str, dtype: str, n: int, *, log: bool = True, root: Path = CACHE
) -> list[Path]:
    """Return the first ``n`` model folders under ``root``, generating the missing ones.

    The base is drawn once per (size, dtype) from a fixed seed; copy k is
    ``base + 0.01 * noise_k`` — a fine-tune's typical distance from its base.
    """
    import torch
    from safetensors.torch import save_file

    shape = SIZES[size]
    dirs = [model_dir(size, dtype, k, root) for k in range(n)]
    missing = [k for k, d in enumerate(dirs) if not (d / "model.safetensors").exists()]
    if not missing:
        return dirs
    torch_dtype = getattr(torch, TORCH_DTYPE[dtype])
    base_gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(s, generator=base_gen) * 0.02 for name, s in shape.tensors().items()}
    for k in missing:
        if log:
            print(f"  generating {size} {dtype} copy {k} -> {dirs[k]}", flush=True)
        gen = torch.Generator().manual_seed(1000 + k)
        tensors = {
            name: torch.add(t, torch.randn(t.shape, generator=gen), alpha=0.01).to(torch_dtype)
            for name, t in base.items()
        }
        dirs[k].mkdir(parents=True, exist_ok=True)
        (dirs[k] / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
        tmp = dirs[k] / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, dirs[k] / "model.safetensors")
        del tensors
    return dirs


def expected_bytes(size: str, dtype: str) -> int:
    """Approximate on-disk size of one copy (tensor data; the header is tiny)."""
    return SIZES[size].n_params() * BYTES_PER[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25M", help="comma list of " + ",".join(SIZES))
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16,fp16")
    parser.add_argument("--n", type=int, default=4, help="number of copies")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            ensure_models(size, dtype, args.n)
            print(f"{size} {dtype}: {SIZES[size].n_params() / 1e6:.1f}M params")


if __name__ == "__main__":
    main()
