"""Model-size axis (issue 13): every recipe on Llama-shaped bf16 folders of ~250M and ~1B
parameters, each in a fresh process, peak anonymous memory of the process tree and wall.

    python benchmarks/bench_scale.py                      # 250M and 1B, N=4 (+ greedy N=2)
    python benchmarks/bench_scale.py --sizes 250M --skip learned

Inputs: `make_inputs.py` copies m00..m03 are the N=4 fine-tunes, m04 the base of wise-ft,
task-arithmetic and stock. The held-out evaluator is a trivial command that reads one
small tensor (`model.norm.weight`) and prints 1.0, so that every greedy candidate ties and
is kept (`--accept ge`): the soup grows to N, the most a greedy step can cost. It logs when
it starts and ends, so a greedy step is measured as the time from the end of one
evaluation to the start of the next: the evaluator's exit, the step's history record
(appended, fsynced), removing the last candidate, computing and writing the next one into
a new temporary folder (with the config files), and starting the evaluator (a shell and a
Python interpreter). No ingredient is copied for a candidate (only for the N scores).

Targets, side by side in one run (printed as ratios, ≤ 1 meets the target):
- peak RssAnon ≤ `import torch` + 4 × the largest tensor in float32, for every CLI recipe;
- greedy flat: 1B minus 250M peak ≤ 4 × the largest tensor's growth (float32), N=2 ≈ N=4;
- greedy step ≤ 1.5 × (one ingredient read + one candidate written) at `cat`'s speed.
  `cat` reads the N inputs twice: first from the disk (`cat`, after the inputs are evicted
  from the page cache with `posix_fadvise(DONTNEED)`, on these files only), then from the
  page cache (`cat, page cache`). The target is at the disk speed; the ratio at the page
  cache's speed (4-10 GB/s here: memory bandwidth, not a disk) is printed beside it;
- stock wall ≤ 2 × uniform wall.

Generated inputs are deleted at the end unless `--keep-inputs`. Results: `--out`
(default `benchmarks/results/scale.{json,md,png}`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_inputs import CACHE, SIZES, ensure_models, expected_bytes  # noqa: E402
from measure import run  # noqa: E402

ROOT = HERE.parent
MiB = 1 << 20

EVAL = """import json, os, struct, sys, time
start = time.time()
p = sys.argv[1]
if os.path.isdir(p):
    p = os.path.join(p, "model.safetensors")
with open(p, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    entry = json.loads(f.read(n))["model.norm.weight"]
    f.seek(8 + n + entry["data_offsets"][0])
    f.read(entry["data_offsets"][1] - entry["data_offsets"][0])
with open(os.environ["BENCH_EVAL_LOG"], "a") as log:
    log.write(json.dumps({"name": os.environ.get("SOUP_CANDIDATE", ""), "start": start,
                          "end": time.time()}) + "\\n")
print(1.0)
"""

LEARNED = """import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from modelsoups import learned_soup
inputs = sys.argv[1:]
config = LlamaConfig.from_pretrained(inputs[0])
with torch.device("meta"):
    model = LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
batch = torch.randint(0, config.vocab_size, (1, 8))
loss = lambda m, b: m(input_ids=b, labels=b).loss
r = learned_soup(inputs, model, loss, [batch], epochs=1)
print(r.coefficients)
"""


def soup(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelsoups", "-q", *args]


def methods(dirs: list[Path], base: Path, out: Path, evaluator: str) -> dict[str, list[str]]:
    """argv of every method on N=4 fine-tunes (greedy also on 2), writing under `out`."""
    ins = [str(d) for d in dirs]
    o = lambda name: ["-o", str(out / f"{name}.safetensors")]  # noqa: E731
    return {
        "cat": ["cat", *[str(d / "model.safetensors") for d in dirs]],  # from the disk
        "cat, page cache": ["cat", *[str(d / "model.safetensors") for d in dirs]],
        "uniform": soup("uniform", *ins, *o("uniform")),
        "weighted": soup("weighted", *ins, "--weights", "0.4,0.3,0.2,0.1", *o("weighted")),
        "greedy": soup("greedy", *ins, *o("greedy"), "--eval", evaluator),
        "greedy N=2": soup("greedy", *ins[:2], *o("greedy2"), "--eval", evaluator),
        # the running sum in RAM (12 bytes per parameter) instead of re-reading the members
        "greedy, sum in memory": soup(
            "greedy", *ins, *o("greedy-mem"), "--eval", evaluator, "--memory", "16G"
        ),
        "wise-ft sweep (2 α)": soup(
            "wise-ft",
            str(base),
            ins[0],
            "--alphas",
            "0.25,0.75",
            "--eval",
            evaluator,
            *o("wise-ft"),
        ),
        "task-arithmetic": soup(
            "task-arithmetic", *ins, "--base", str(base), "--scale", "0.5", *o("task-arithmetic")
        ),
        "stock": soup("stock", *ins, "--base", str(base), *o("stock")),
        "learned (API)": [sys.executable, "-c", LEARNED, *ins],
    }


def greedy_steps(log: Path) -> list[float]:
    """Seconds from the end of each evaluation to the start of the next candidate's."""
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return [b["start"] - a["end"] for a, b in itertools.pairwise(rows)
            if b["name"].startswith("greedy soup of")]  # fmt: skip


def evict(path: Path) -> None:
    """Drop `path`'s pages from the page cache (written back first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def baseline(env: dict[str, str]) -> dict[str, int]:
    """Peak RssAnon of the interpreter alone and with torch imported (median of 3)."""
    out = {}
    for name, code in {"python": "pass", "torch": "import torch, safetensors.torch"}.items():
        peaks = sorted(run([sys.executable, "-c", code], env=env).peak_anon_bytes for _ in range(3))
        out[name] = peaks[1]
    return out


def bench_size(size: str, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    shape = SIZES[size]
    need = 6 * expected_bytes(size, "bf16") + (10 << 30)
    free = shutil.disk_usage(CACHE.parent).free
    if free < need:
        print(f"{size}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f}: skipped")
        return []
    dirs = ensure_models(size, "bf16", 5)
    base, fine = dirs[4], dirs[:4]
    for d in dirs:  # `cat` reads them from the disk
        evict(d / "model.safetensors")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=CACHE) as tmp:
        work = Path(tmp)
        (work / "eval.py").write_text(EVAL)
        evaluator = f"{sys.executable} {work / 'eval.py'} {{ckpt}}"
        for name, argv in methods(fine, base, work, evaluator).items():
            big = name.startswith("learned") or "in memory" in name  # 12+ bytes per parameter
            if any(s in name for s in args.skip) or (big and size != "250M"):
                rows.append({"size": size, "method": name, "skipped": True})
                continue
            log = work / "eval.jsonl"
            log.unlink(missing_ok=True)
            m = run(argv, env={**env, "BENCH_EVAL_LOG": str(log)}, cwd=work, timeout_s=3600)
            row = {"size": size, "method": name, "params": shape.n_params(),
                   "largest": shape.largest_tensor_numel(), "wall_s": m.wall_s,
                   "peak_anon": m.peak_anon_bytes, "rc": m.returncode,
                   "input_bytes": sum((d / "model.safetensors").stat().st_size for d in fine),
                   "steps_s": greedy_steps(log), "stderr": m.stderr_tail[-300:],
                   "load": os.getloadavg()[0]}  # fmt: skip
            print(f"  {size:5s} {name:22s} {m.wall_s:7.2f} s {m.peak_anon_bytes / MiB:8.0f} MiB "
                  f"rc={m.returncode} load {row['load']:.1f} "
                  f"{' '.join(f'{s:.2f}' for s in row['steps_s'])}",
                  flush=True)  # fmt: skip
            rows.append(row)
            for p in work.iterdir():  # outputs, reports, histories
                if p.name not in ("eval.py",):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    if not args.keep_inputs:
        shutil.rmtree(CACHE / f"{size}-bf16")
    return rows


def table(rows: list[dict], base: dict[str, int]) -> str:
    """Markdown: one row per (size, method), then the targets as ratios."""
    by = {(r["size"], r["method"]): r for r in rows if not r.get("skipped")}
    lines = [
        f"Baselines: `python -c pass` {base['python'] / MiB:.0f} MiB, `import torch` "
        f"{base['torch'] / MiB:.0f} MiB peak RssAnon.", "",
        "| size | recipe | wall s | peak RssAnon MiB | ÷ budget | notes |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']} | {r['method']} | – | – | – | skipped |")
            continue
        budget = base["torch"] + 4 * 4 * r["largest"]
        notes = "" if r["rc"] == 0 else f"exit {r['rc']}: {r['stderr'].strip().splitlines()[-1:]}"
        if r["steps_s"]:
            notes += "steps " + ", ".join(f"{s:.2f}" for s in r["steps_s"]) + " s"
        if "load" in r:
            notes += f"{'; ' if notes else ''}load {r['load']:.1f} after"
        ratio = "" if r["method"].startswith("cat") else f"{r['peak_anon'] / budget:.2f}"
        lines.append(f"| {r['size']} | {r['method']} | {r['wall_s']:.1f} | "
                     f"{r['peak_anon'] / MiB:.0f} | {ratio} | {notes} |")  # fmt: skip
    lines += ["", "| target | measured | ratio (≤ 1 meets it) |", "|---|---|---|"]
    sizes = sorted({r["size"] for r in rows}, key=lambda s: SIZES[s].n_params())
    for size in sizes:
        cat, greedy = by.get((size, "cat")), by.get((size, "greedy"))
        hot = by.get((size, "cat, page cache"))
        for name in ("greedy", "greedy, sum in memory"):
            g = by.get((size, name))
            if cat and g and g["steps_s"]:
                speed = cat["input_bytes"] / cat["wall_s"]
                one = cat["input_bytes"] / 4
                limit = 1.5 * 2 * one / speed
                worst = max(g["steps_s"])
                cached = ""
                if hot:
                    cache_speed = hot["input_bytes"] / hot["wall_s"]
                    fast = 1.5 * 2 * one / cache_speed
                    cached = (f" (at the page cache's {cache_speed / 1e9:.1f} GB/s: "
                              f"{fast:.2f} s, {worst / fast:.1f})")  # fmt: skip
                lines.append(f"| {size} {name} step ≤ 1.5 × (read + write {one / 1e9:.2f} GB "
                             f"each) at cat {speed / 1e9:.2f} GB/s from the disk = "
                             f"{limit:.2f} s | slowest step {worst:.2f} s | "
                             f"{worst / limit:.2f}{cached} |")  # fmt: skip
        uni, stock = by.get((size, "uniform")), by.get((size, "stock"))
        if uni and stock:
            lines.append(
                f"| {size} stock wall ≤ 2 × uniform | {stock['wall_s']:.1f} vs "
                f"{uni['wall_s']:.1f} s | {stock['wall_s'] / (2 * uni['wall_s']):.2f} |"
            )
        g2 = by.get((size, "greedy N=2"))
        if greedy and g2:
            d = greedy["peak_anon"] - g2["peak_anon"]
            lines.append(f"| {size} greedy N=4 peak ≈ N=2 (± 64 MiB) | "
                         f"{greedy['peak_anon'] / MiB:.0f} vs {g2['peak_anon'] / MiB:.0f} MiB | "
                         f"{abs(d) / (64 * MiB):.2f} |")  # fmt: skip
    if len(sizes) == 2:
        small, big = (by.get((s, "greedy")) for s in sizes)
        if small and big:
            growth = 4 * (big["largest"] - small["largest"])  # float32 bytes
            d = big["peak_anon"] - small["peak_anon"]
            lines.append(f"| greedy {sizes[0]} → {sizes[1]} peak growth ≤ 4 × largest tensor's "
                         f"growth ({4 * growth / MiB:.0f} MiB) | {d / MiB:+.0f} MiB | "
                         f"{max(d, 0) / (4 * growth):.2f} |")  # fmt: skip
    failed = [r for r in rows if not r.get("skipped") and r["rc"] != 0]
    for r in failed:
        lines.append(f"\n{r['size']} {r['method']} failed: `{r['stderr'].strip()[-300:]}`")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], base: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped") and not r["method"].startswith("cat")]
    sizes = sorted({r["size"] for r in done}, key=lambda s: SIZES[s].n_params())
    names = list(dict.fromkeys(r["method"] for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(sizes), 1)
    for j, size in enumerate(sizes):
        got = {r["method"]: r for r in done if r["size"] == size}
        xs = [i + j * width for i in range(len(names))]
        axes[0].bar(xs, [got[n]["peak_anon"] / MiB if n in got else 0 for n in names], width,
                    label=size)  # fmt: skip
        axes[1].bar(xs, [got[n]["wall_s"] if n in got else 0 for n in names], width, label=size)
        largest = SIZES[size].largest_tensor_numel()
        axes[0].axhline((base["torch"] + 16 * largest) / MiB, ls="--", color=f"C{j}", lw=1)
    for ax, title in zip(axes, ["peak RssAnon (MiB); dashed: import torch + 4 × largest fp32",
                                "wall (s)"], strict=True):  # fmt: skip
        ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def snapshot(commit: str) -> Path:
    """`src/` of `commit`, extracted once under the cache: the run does not change code
    when someone edits the work tree during it (as `bench_merge.py` does)."""
    folder = CACHE / f"snapshot-{commit}"
    if not (folder / "src").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="250M,1B")
    p.add_argument("--skip", default="", help="comma list of method name parts to skip")
    p.add_argument("--keep-inputs", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "scale"))
    p.add_argument(
        "--rows",
        default=None,
        help="results JSON of an earlier run: its rows of other sizes are kept",
    )
    p.add_argument("--snapshot", default="HEAD", help="git ref whose src/ runs ('' = work tree)")
    args = p.parse_args()
    args.skip = [s for s in args.skip.split(",") if s]
    # SOUP_UNSUPERVISED: `soup` would otherwise fork after its imports and wait for the
    # child; the tree's RssAnon would count the pages they share (torch) twice.
    ref = args.snapshot or "HEAD"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    src = ROOT / "src" if not args.snapshot else snapshot(commit)
    env = {**os.environ, "PYTHONPATH": str(src), "SOUP_UNSUPERVISED": "1"}
    base = baseline(env)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[dict] = []
    if args.rows:  # sizes measured by an earlier run of the same snapshot
        earlier = json.loads(Path(args.rows).read_text())
        rows = [r for r in earlier["rows"] if r["size"] not in args.sizes.split(",")]
    for size in args.sizes.split(","):
        rows += bench_size(size, args, env)
    header = (f"# Model-size axis (issue 13)\n\nCommit {commit}, {started}, load "
              f"{os.getloadavg()[0]:.1f} at the end; bf16 Llama folders, N=4.\n\n")  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, "baseline": base,
                                                    "rows": rows}, indent=1))  # fmt: skip
    out.with_suffix(".md").write_text(header + table(rows, base))
    plot(rows, base, out.with_suffix(".png"))
    print(header + table(rows, base))


if __name__ == "__main__":
    main()
