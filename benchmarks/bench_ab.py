"""A/B of `soup` commands: code versions and environments side by side, interleaved.

    python benchmarks/bench_ab.py --inputs benchmarks/.cache/110M-fp32 --n 16 \
        --variant old=772ec67 --variant new=HEAD --variant live=. --reps 5

Each variant is `LABEL=REF[,VAR=VALUE...]`: REF is a git ref whose `src/` is extracted once
(`.` = the live work tree), the VARs are set in its environment (`SOUP_UNSUPERVISED=1`),
except `recipe=NAME`, which overrides `--recipe` for that variant, and `args=...`, options
appended to its command (`args=--accumulate float64`). The recipe is `uniform`
(of the last N of m00..mN that exist), `stock` (fine-tunes m01..mN, base m00) or `help`
(`soup --help`). Every round
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
    options = {lab: extra.pop("args", "").split() for lab, _, extra in variants}
    envs = {lab: {**os.environ, **extra, "PYTHONPATH": str(source(ref))}
            for lab, ref, extra in variants}  # fmt: skip
    out = HERE / ".cache" / "out" / f"ab-{os.getpid()}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    labels = [v[0] for v in variants]
    for rep in range(args.reps):
        k = rep % len(labels)
        for label in labels[k:] + labels[:k]:
            cmd = [*command(recipes[label], dirs, args.n, out), *options[label]]
            runs.append(measure_one(label, rep, cmd, envs[label], out))
    print(table(runs, labels, args))
    if args.out:
        meta = {"when": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "recipe": args.recipe,
                "inputs": str(args.inputs), "n": args.n, "variants": args.variant}  # fmt: skip
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
        args.out.with_suffix(".md").write_text(table(runs, labels, args))


def measure_one(label: str, rep: int, cmd: list[str], env: dict[str, str], out: Path) -> dict:
    """One run in a fresh process; the output is deleted (with its page cache) afterwards."""
    load = os.getloadavg()[0]
    m = run(cmd, env=env, timeout_s=3600)
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    row = {
        "label": label,
        "rep": rep,
        "wall_s": m.wall_s,
        "peak_mib": m.peak_anon_bytes / MiB,
        "user_s": m.cpu_user_s,
        "sys_s": m.cpu_sys_s,
        "load": load,
        "rc": m.returncode,
    }
    error = f" {m.stderr_tail[-300:]}" if m.returncode else ""
    print(f"{label:14s} rep {rep}: {m.wall_s:6.2f} s {row['peak_mib']:6.0f} MiB user "
          f"{m.cpu_user_s:5.2f} sys {m.cpu_sys_s:5.2f} load {load:4.2f} rc {m.returncode}{error}",
          flush=True)  # fmt: skip
    return row


def table(runs: list[dict], labels: list[str], args: argparse.Namespace) -> str:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["label"] == label and r["rc"] == 0)

    first = labels[0]
    lines = [f"`soup {args.recipe}`, {args.inputs} N={args.n}, {args.reps} interleaved rounds, "
             f"medians; variants: {', '.join(args.variant)}", "",
             f"| variant | wall s | ÷ {first} | peak RssAnon MiB | user s | sys s | load |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label in labels:
        load = [r["load"] for r in runs if r["label"] == label]
        wall = med(label, "wall_s")
        lines.append(f"| {label} | {wall:.2f} | {wall / med(first, 'wall_s'):.3f} | "
                     f"{med(label, 'peak_mib'):.0f} | {med(label, 'user_s'):.2f} | "
                     f"{med(label, 'sys_s'):.2f} | {min(load):.2f}–{max(load):.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
