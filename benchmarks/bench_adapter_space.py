"""AdapterSpace memory (issue 14): the space held in RAM before (cb5c1ff) and now, side by side.

    python benchmarks/bench_adapter_space.py                # N = 8, 16, 32; 16 modules 1024², r=16
    python benchmarks/bench_adapter_space.py --n 4 --d 256   # a quick run

Each row runs, in fresh processes, the same script against two versions of modelsoups: the
`--before` commit (default cb5c1ff: the space held every adapter's unpadded factors, float32)
and this checkout (the space holds no tensor: factors are read from the adapters' memory-
mapped files when a key is read). The script builds an `AdapterSpace` of N fp32 adapters,
notes its RssAnon, then computes one uniform mean of `space.ingredients` key by key, each
key dropped once computed (as a candidate streamed to a file or a model). Figures are
RssAnon above a baseline process that only imports torch and modelsoups: "held" right after
the space is built, "peak" over the whole run (`measure.run`); wall is the mean's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import run  # noqa: E402

MiB = 1 << 20

CHILD = """import json, sys, time, torch
import modelsoups as ms
torch.set_num_threads(1)
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "baseline":  # the interpreter, torch and modelsoups imported
    print(json.dumps({"held": anon()}))
    sys.exit()
space = ms.AdapterSpace(sys.argv[2:])
held, started = anon(), time.perf_counter()
ings = space.ingredients
for k in ings[0].infos:
    acc = ings[0].get(k).clone()
    for c in ings[1:]:
        acc.add_(c.get(k))
    acc /= len(ings)
print(json.dumps({"held": held, "mean_s": time.perf_counter() - started}))
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


def checkout(rev: str, root: Path) -> Path:
    """The `src` folder of commit `rev`, extracted under `root`."""
    out = root / f"src-{rev}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "src"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


def measure(src: Path, args: list[str]) -> tuple[float, float, float]:
    """(held MiB, peak MiB, mean seconds) of one child run against `src`."""
    import os

    env = {**os.environ, "PYTHONPATH": str(src)}
    m = run([sys.executable, "-c", CHILD, *args], env=env, stdout_devnull=False)
    if m.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {m.stderr_tail}")
    out = json.loads(m.stdout.strip().splitlines()[-1])
    return out["held"] / MiB, m.peak_anon_bytes / MiB, float(out.get("mean_s", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--modules", type=int, default=16)
    ap.add_argument("--before", default="cb5c1ff", help="the commit to compare with")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_adapter_space_"))
    try:
        runs = make_adapters(root, max(args.n), args.d, args.r, args.modules)
        srcs = {"before": checkout(args.before, root), "now": HERE.parent / "src"}
        own = 2 * args.d * args.r * 4 * args.modules  # bytes of one adapter
        print(f"d={args.d} r={args.r} modules={args.modules}, one adapter {own / MiB:.1f} MiB; "
              f"before = {args.before}")  # fmt: skip
        header = ("N", "held before", "held now", "peak before", "peak now", "mean s before",
                  "mean s now")  # fmt: skip
        print("{:>4} {:>12} {:>9} {:>12} {:>9} {:>14} {:>11}".format(*header))
        base = {k: measure(src, ["baseline"])[0] for k, src in srcs.items()}
        for n in args.n:
            got = {k: measure(src, ["space", *map(str, runs[:n])]) for k, src in srcs.items()}
            (hb, pb, wb), (hn, pn, wn) = got["before"], got["now"]
            hb, pb, hn, pn = (
                hb - base["before"],
                pb - base["before"],
                hn - base["now"],
                pn - base["now"],
            )
            print(f"{n:>4} {hb:>12.1f} {hn:>9.1f} {pb:>12.1f} {pn:>9.1f} {wb:>14.2f} {wn:>11.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
