"""float64 vs float32 accumulation of `soup uniform`, side by side (issue 13).

Runs `soup --quiet uniform DIR... -o OUT.safetensors` with `--accumulate float32` and
`--accumulate float64` on the same warm-cache inputs, alternating the two in every
repetition (the machine is shared: interleaving exposes both to the same load), each in a
fresh process from a snapshot of `src/` at `--snapshot`. Prints one row per repetition and
the ratio of medians; the load average is read before every run.

    python benchmarks/bench_accumulate.py --size 110M --n 16 --dtype fp32 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from make_inputs import SIZES, ensure_models
from measure import run

HERE = Path(__file__).resolve().parent


def snapshot(ref: str) -> Path:
    """`src/` of git `ref`, extracted once into `.cache/snapshot-<sha>/` (or the work tree)."""
    if not ref:
        return HERE.parent / "src"
    root = str(HERE.parent)
    sha = subprocess.check_output(["git", "-C", root, "rev-parse", "--short", ref], text=True)
    sha = sha.strip()
    dest = HERE / ".cache" / f"snapshot-{sha}"
    if not (dest / "src").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(
            ["git", "-C", root, "archive", ref, "src"], stdout=subprocess.PIPE
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
        archive.wait()
    return dest / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="110M", choices=list(SIZES))
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--snapshot", default="HEAD", help="git ref of src/ ('' = work tree)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    args = parser.parse_args()
    dirs = ensure_models(args.size, args.dtype, args.n)
    env = {**os.environ, "PYTHONPATH": str(snapshot(args.snapshot))}
    out_dir = Path(tempfile.mkdtemp(prefix="bench-acc-", dir=HERE / ".cache"))
    runs: dict[str, list[dict[str, float]]] = {"float32": [], "float64": []}
    try:
        for _ in range(3):  # warm the page cache with the inputs
            subprocess.run(["cat", *[str(d / "model.safetensors") for d in dirs]],
                           stdout=subprocess.DEVNULL, check=True)  # fmt: skip
        print(f"{args.size} {args.dtype} N={args.n}; rep, accumulate, wall s, peak MiB, load1")
        for rep in range(args.reps):
            order = ["float32", "float64"] if rep % 2 == 0 else ["float64", "float32"]
            for acc in order:
                out = out_dir / f"{acc}.safetensors"
                out.unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "modelsoups", "--quiet", "uniform",
                       *map(str, dirs), "-o", str(out), "--accumulate", acc]  # fmt: skip
                load = os.getloadavg()[0]
                m = run(cmd, env=env)
                if m.returncode != 0:
                    raise SystemExit(f"{acc} failed: {m.stderr_tail}")
                runs[acc].append({"wall_s": m.wall_s, "peak_mib": m.peak_anon_bytes / 2**20,
                                  "load1": load})  # fmt: skip
                print(f"{rep} {acc} {m.wall_s:.2f} {m.peak_anon_bytes / 2**20:.0f} {load:.2f}",
                      flush=True)  # fmt: skip
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    loads = [r["load1"] for v in runs.values() for r in v]
    print(f"median wall: float32 {med['float32']:.2f} s, float64 {med['float64']:.2f} s, "
          f"float64/float32 = {med['float64'] / med['float32']:.3f}; "
          f"load {min(loads):.2f}-{max(loads):.2f}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "median_wall_s": med}, indent=2))


if __name__ == "__main__":
    main()
