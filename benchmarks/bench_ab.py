"""A/B of `soup` commands: code versions and environments side by side, interleaved.

    python benchmarks/bench_ab.py --inputs benchmarks/.cache/110M-fp32 --n 16 \
        --variant old=772ec67 --variant new=HEAD --variant live=. --reps 5

Each variant is `LABEL=REF[,VAR=VALUE...]`: REF is a git ref whose `src/` is extracted once
(`.` = the live work tree), the VARs are set in its environment (`SOUP_UNSUPERVISED=1`),
except `recipe=NAME`, which overrides `--recipe` for that variant. The recipe is `uniform`
(of the last N of m00..mN that exist), `stock` (fine-tunes m01..mN, base m00) or `help` (`soup --help`). Every round
runs each variant once, in an order rotated from round to round, so that a change of load
during the run hits every variant alike; each run is a fresh process measured by
`measure.run` (wall, peak RssAnon of the process tree, user/sys CPU), with the 1-minute load
average beside it. The table gives the median per variant and its ratio to the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import run  # noqa: E402

ROOT = HERE.parent
MiB = 1 << 20


def source(ref: str) -> Path:
    """`src/` of `ref` (extracted once into the cache), or the live tree for `.`."""
    if ref == ".":
        return ROOT / "src"
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    folder = HERE / ".cache" / f"snapshot-{sha}"
    if not (folder / "src" / "modelsoups" / "__init__.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def variant(spec: str) -> tuple[str, str, dict[str, str]]:
    label, _, rest = spec.partition("=")
    ref, *assignments = rest.split(",")
    return label, ref, dict(a.split("=", 1) for a in assignments)


def command(recipe: str, dirs: list[Path], n: int, out: Path) -> list[str]:
    soup = [sys.executable, "-m", "modelsoups", "--quiet"]
    if recipe == "stock":
        return [*soup, "stock", *map(str, dirs[1:]), "--base", str(dirs[0]), "-o", str(out)]
    if recipe == "help":
        return [*soup, "--help"]
    return [*soup, recipe, *map(str, dirs[-n:]), "-o", str(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=Path, help="folder of m00, m01, ... model folders")
    p.add_argument("--n", type=int, default=16, help="ingredients: m01..mN (m00: the base)")
    p.add_argument("--recipe", default="uniform")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, help="results JSON (default: print only)")
    args = p.parse_args()
    dirs = sorted(args.inputs.glob("m*"))[: args.n + 1] if args.inputs else []
    for d in dirs:  # warm the page cache
        subprocess.run(["cat", *map(str, d.glob("*.safetensors"))], stdout=subprocess.DEVNULL)
    variants = [variant(v) for v in args.variant]
    recipes = {lab: extra.pop("recipe", args.recipe) for lab, _, extra in variants}
    envs = {lab: {**os.environ, **extra, "PYTHONPATH": str(source(ref))}
            for lab, ref, extra in variants}  # fmt: skip
    out = HERE / ".cache" / "out" / "ab.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, object]] = []
    labels = [v[0] for v in variants]
    for rep in range(args.reps):
        k = rep % len(labels)
        for label in labels[k:] + labels[:k]:
            load = os.getloadavg()[0]
            m = run(command(recipes[label], dirs, args.n, out), env=envs[label], timeout_s=3600)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            row = {"label": label, "rep": rep, "wall_s": m.wall_s, "peak_mib": m.peak_anon_bytes / MiB,
                   "user_s": m.cpu_user_s, "sys_s": m.cpu_sys_s, "load": load, "rc": m.returncode}  # fmt: skip
            runs.append(row)
            print(f"{label:12s} rep {rep}: {m.wall_s:6.2f} s {row['peak_mib']:6.0f} MiB "
                  f"user {m.cpu_user_s:5.2f} sys {m.cpu_sys_s:5.2f} load {load:4.2f} rc {m.returncode}"
                  + (f" {m.stderr_tail[-300:]}" if m.returncode else ""), flush=True)  # fmt: skip
    print(table(runs, labels, args, variants))
    if args.out:
        meta = {"when": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "recipe": args.recipe,
                "inputs": str(args.inputs), "n": args.n, "variants": args.variant}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        args.out.with_suffix(".md").write_text(table(runs, labels, args, variants))


def table(runs: list[dict], labels: list[str], args: argparse.Namespace, variants: list) -> str:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["label"] == label and r["rc"] == 0)

    first = labels[0]
    lines = [f"`soup {args.recipe}`, {args.inputs} N={args.n}, {args.reps} interleaved rounds, "
             f"medians; variants: {', '.join(args.variant)}", "",
             "| variant | wall s | ÷ " + first + " | peak RssAnon MiB | user s | sys s | load (min–max) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label in labels:
        loads = [r["load"] for r in runs if r["label"] == label]
        lines.append(f"| {label} | {med(label, 'wall_s'):.2f} | "
                     f"{med(label, 'wall_s') / med(first, 'wall_s'):.3f} | "
                     f"{med(label, 'peak_mib'):.0f} | {med(label, 'user_s'):.2f} | "
                     f"{med(label, 'sys_s'):.2f} | {min(loads):.2f}–{max(loads):.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
