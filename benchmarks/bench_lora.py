"""LoRA adapter soups (issue 14): a 1B-shaped Llama base, r = 16 on every linear layer, N = 8.

    python benchmarks/bench_lora.py                 # 1B bf16 base, N=8 fp32 adapters
    python benchmarks/bench_lora.py --size 25M --n 3  # a quick run

Side by side in one run, each in a fresh process, peak anonymous memory of the process
tree (`measure.run`) and wall time:

- `soup uniform A1..AN -o OUT`: the exact adapter soup (rank N·16, no base read);
- `soup uniform A1..AN --merge-into BASE -o OUT`: the merged full model, streamed;
- PEFT: `PeftModel.from_pretrained` + `load_adapter` ×(N-1) +
  `add_weighted_adapter(..., combination_type="cat")` + `save_pretrained` of the soup
  adapter (the same exact soup, by loading the whole base model), and the same followed by
  `merge_and_unload()` + `save_pretrained` (the merged model).

The base is generated with random weights (`make_inputs.py`), the adapters are written in
PEFT's file format with random A and B. The outputs of both tools are compared on one
module (ΔW of the exact soups must agree). Everything generated is deleted at the end
unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_inputs import SIZES, ensure_models, model_dir  # noqa: E402
from measure import run  # noqa: E402

MiB = 1 << 20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT = """import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, out, merge, adapters = sys.argv[1], sys.argv[2], sys.argv[3] == "merge", sys.argv[4:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, a in enumerate(adapters[1:], 1):
    model.load_adapter(a, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(adapters))]
model.add_weighted_adapter(names, [1 / len(names)] * len(names), "soup", combination_type="cat")
if merge:
    model.set_adapter("soup")
    for n in names:
        model.delete_adapter(n)
    model.merge_and_unload().save_pretrained(out)
else:
    model.save_pretrained(out, selected_adapters=["soup"])
"""


def make_adapters(base: Path, root: Path, n: int, r: int) -> list[Path]:
    """N adapters in PEFT's format: random A (r × k) and B (d × r), fp32, α = 2r."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    modules = sorted(k.removesuffix(".weight") for k in shapes if k.split(".")[-2] in TARGETS)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for m in modules:
            d, k = shapes[m + ".weight"]
            p = f"base_model.model.{m}"
            tensors[p + ".lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            tensors[p + ".lora_B.weight"] = torch.randn(d, r, generator=g) * 0.01
        folder = root / f"adapter{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": r,
                  "lora_alpha": 2 * r, "target_modules": list(TARGETS), "task_type": None,
                  "bias": "none", "fan_in_fan_out": False, "use_rslora": False}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out.append(folder)
    return out


def delta(adapter: Path, module: str) -> object:
    """s·B·A of `module` in a saved adapter (float64)."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    r = config.get("rank_pattern", {}).get(module, config["r"])
    alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
    p = f"base_model.model.{module}"
    b, a = t[p + ".lora_B.weight"].double(), t[p + ".lora_A.weight"].double()
    return alpha / r * (b @ a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1B", choices=sorted(SIZES))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()

    (base,) = ensure_models(args.size, "bf16", 1)
    (HERE / ".cache").mkdir(exist_ok=True)  # git-ignored
    work = Path(tempfile.mkdtemp(prefix="bench-lora-", dir=HERE / ".cache"))
    try:
        adapters = make_adapters(base, work, args.n, args.rank)
        ins = [str(a) for a in adapters]
        soup = [sys.executable, "-m", "modelsoups", "-q", "uniform", *ins]
        peft = [sys.executable, "-c", PEFT, str(base)]
        merge = ["--merge-into", str(base)]
        cases = {
            "modelsoups exact adapter": [*soup, "-o", str(work / "ms-adapter")],
            "modelsoups --merge-into": [*soup, *merge, "-o", str(work / "ms-merged")],
        }
        if not args.skip_peft:
            cases["PEFT cat adapter"] = [*peft, str(work / "peft-adapter"), "adapter", *ins]
            cases["PEFT cat + merge_and_unload"] = [*peft, str(work / "peft-merged"), "merge", *ins]
        rows = {}
        for name, cmd in cases.items():
            m = run(cmd, timeout_s=3600)
            rows[name] = m
            status = "ok" if m.returncode == 0 else f"FAILED ({m.stderr_tail[-300:]!r})"
            peak = m.peak_anon_bytes / MiB
            print(
                f"{name:32s} wall {m.wall_s:7.1f} s  peak anon {peak:8.0f} MiB  {status}",
                flush=True,
            )
        report(rows, base, adapters, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(model_dir(args.size, "bf16", 0).parent, ignore_errors=True)


def report(rows: dict, base: Path, adapters: list[Path], work: Path, args: object) -> None:
    from safetensors import safe_open

    shape = SIZES[args.size]  # type: ignore[attr-defined]
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    adapter_size = (adapters[0] / "adapter_model.safetensors").stat().st_size
    print(f"\nbase {args.size} ({shape.n_params() / 1e6:.0f}M params, bf16, {size / MiB:.0f} MiB); "  # type: ignore[attr-defined]
          f"{len(adapters)} adapters of {adapter_size / MiB:.1f} MiB (r={args.rank}, fp32)")  # type: ignore[attr-defined]  # fmt: skip
    largest = shape.largest_tensor_numel() * 4
    print(f"largest tensor in fp32: {largest / MiB:.0f} MiB\n")
    print("| method | wall (s) | peak anon (MiB) | peak / largest fp32 tensor |")
    print("|---|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m.wall_s:.1f} | {m.peak_anon_bytes / MiB:.0f} | "
              f"{m.peak_anon_bytes / largest:.1f} |")  # fmt: skip
    pairs = [("modelsoups exact adapter", "PEFT cat adapter"),
             ("modelsoups --merge-into", "PEFT cat + merge_and_unload")]  # fmt: skip
    for ours, theirs in pairs:
        if ours in rows and theirs in rows and rows[theirs].returncode == 0:
            a, b = rows[ours], rows[theirs]
            print(f"{ours} / {theirs}: wall {a.wall_s / b.wall_s:.2f}x, "
                  f"peak {a.peak_anon_bytes / b.peak_anon_bytes:.2f}x")  # fmt: skip
    if (work / "peft-adapter").exists():
        module = "model.layers.0.self_attn.q_proj"
        peft_dir = work / "peft-adapter" / "soup"
        peft_dir = peft_dir if peft_dir.exists() else work / "peft-adapter"
        ours, theirs = delta(work / "ms-adapter", module), delta(peft_dir, module)
        with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as f:
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})  # noqa: SIM118
        print(f"PEFT's soup adapter is stored as {', '.join(dtypes)}; modelsoups' as F32")
        diff = float((ours - theirs).abs().max() / theirs.abs().max())  # type: ignore[operator]
        print(f"exact soups agree on {module}: max |ΔW_ms − ΔW_peft| / max |ΔW| = {diff:.2e}")


if __name__ == "__main__":
    main()
