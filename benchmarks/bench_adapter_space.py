"""AdapterSpace memory (issue 14): lazy ingredients vs N padded state dicts, side by side.

    python benchmarks/bench_adapter_space.py               # N = 8, 16; 16 modules 1024², r=16
    python benchmarks/bench_adapter_space.py --n 4 --d 256  # a quick run

Each row is a fresh process (`measure.run`: peak RssAnon of the process) that builds an
`AdapterSpace` of N fp32 adapters and computes one uniform mean reading one key at a time,
from `space.ingredients` (lazy: padded tensors built on `get`) or from `space.state_dicts`
(every padded state dict built at once, what the space held before). Padded state dicts
grow as N²·r·d; the lazy space as N·r·d (the adapters' own tensors) plus the output (rank
N·r). Figures are above a baseline process that only imports torch and modelsoups.
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

from measure import run  # noqa: E402

MiB = 1 << 20

CHILD = """import sys, torch
import modelsoups as ms
torch.set_num_threads(1)
if sys.argv[1] == "baseline":  # the interpreter, torch and modelsoups imported
    sys.exit()
space = ms.AdapterSpace(sys.argv[2:])
if sys.argv[1] == "lazy":
    ings = space.ingredients
    read, keys = (lambda c, k: c.get(k)), list(ings[0].infos)
else:
    ings = space.state_dicts
    read, keys = (lambda c, k: c[k]), list(ings[0])
out = {}
for k in keys:
    acc = read(ings[0], k).clone()
    for c in ings[1:]:
        acc.add_(read(c, k))
    out[k] = acc / len(ings)
"""


def make_adapters(root: Path, n: int, d: int, r: int, modules: int) -> list[Path]:
    """N adapters in PEFT's format: random fp32 A (r × d) and B (d × r) on `modules` modules."""
    import torch
    from safetensors.torch import save_file

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        p = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
        tensors = {p.format(m, x): torch.randn(*((r, d) if x == "A" else (d, r)), generator=g)
                   for m in range(modules) for x in "AB"}  # fmt: skip
        folder = root / f"run{i:03d}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "base_model_name_or_path": "base", "r": r,
                  "lora_alpha": 2 * r, "target_modules": ["q_proj"]}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out.append(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--modules", type=int, default=16)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_adapter_space_"))
    try:
        runs = make_adapters(root, max(args.n), args.d, args.r, args.modules)
        own = 2 * args.d * args.r * 4 * args.modules  # bytes of one adapter
        print(f"d={args.d} r={args.r} modules={args.modules}, one adapter {own / MiB:.1f} MiB")
        header = ("N", "lazy MiB", "padded MiB", "padded/lazy", "wall lazy/padded")
        print("{:>4} {:>9} {:>11} {:>12} {:>17}".format(*header))
        base = run([sys.executable, "-c", CHILD, "baseline"]).peak_anon_bytes
        for n in args.n:
            got = {}
            for kind in ("lazy", "padded"):
                m = run([sys.executable, "-c", CHILD, kind, *map(str, runs[:n])])
                if m.returncode != 0:
                    raise SystemExit(f"{kind} N={n} failed: {m.stderr_tail}")
                got[kind] = m
            lazy, padded = (got[k].peak_anon_bytes - base for k in ("lazy", "padded"))
            wall = got["lazy"].wall_s / got["padded"].wall_s
            print(f"{n:>4} {lazy / MiB:>9.1f} {padded / MiB:>11.1f} {padded / lazy:>12.2f} "
                  f"{wall:>17.2f}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
