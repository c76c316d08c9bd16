"""Model-size axis (issue 13): every recipe on Llama-shaped bf16 folders of ~250M and ~1B
parameters, each in a fresh process, peak anonymous memory of the process tree and wall.

    python benchmarks/bench_scale.py                      # 250M and 1B, N=4 (+ greedy N=2)
    python benchmarks/bench_scale.py --sizes 250M --skip learned
    python benchmarks/bench_scale.py --inputs /other/benchmarks/.cache --reps 3

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
- stock wall ≤ 2 × uniform wall. Uniform and stock run in `--reps` interleaved rounds
  (default 2: uniform, stock, uniform, stock), right after the two `cat` rows; before each
  of these runs an untimed `cat` of all five inputs to /dev/null puts them in the page
  cache, so both recipes start from the same state (every input cached, the last output
  deleted). The table gives the median walls, their ratio and each round's ratio.

Inputs: `--inputs DIR` holds `<size>-bf16/m00..m04` (default `benchmarks/.cache`). Complete
folders are reused as they are (read only: never rewritten or deleted), so a second run
does not regenerate ~12 GB; missing ones are generated there and deleted at the end unless
`--keep-inputs`. Results: `--out` (default `benchmarks/results/scale.{json,md,png}`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_inputs import CACHE, SIZES, ensure_models, expected_bytes, model_dir  # noqa: E402
from measure import run  # noqa: E402
from scale_report import plot, table  # noqa: E402

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
    root = Path(args.inputs)
    present = [model_dir(size, "bf16", k, root) for k in range(5)]
    missing = [d for d in present if not (d / "model.safetensors").exists()]
    need = (len(missing) + 3) * expected_bytes(size, "bf16") + (2 << 30)  # + outputs
    CACHE.mkdir(exist_ok=True)  # outputs are written here
    free = shutil.disk_usage(CACHE).free
    if free < need:
        print(f"{size}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f}: skipped")
        return []
    dirs = ensure_models(size, "bf16", 5, root=root)
    base, fine = dirs[4], dirs[:4]
    for d in dirs:  # `cat` reads them from the disk
        evict(d / "model.safetensors")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=CACHE) as tmp:
        work = Path(tmp)
        (work / "eval.py").write_text(EVAL)
        evaluator = f"{sys.executable} {work / 'eval.py'} {{ckpt}}"
        argvs = methods(fine, base, work, evaluator)
        for name, argv in argvs.items():
            big = name.startswith("learned") or "in memory" in name  # 12+ bytes per parameter
            if any(s in name for s in args.skip) or (big and size != "250M"):
                rows.append({"size": size, "method": name, "skipped": True})
            elif name in PAIRED:  # after `cat`: measured in interleaved rounds, below
                continue
            else:
                rows.append(measure_one(size, name, argv, work, env, fine))
            if name == "cat, page cache":
                names = [n for n in PAIRED if not any(s in n for s in args.skip)]
                rows += paired(size, {n: argvs[n] for n in names}, args.reps, work, env, dirs)
    if missing and not args.keep_inputs:  # only what this run generated
        for d in missing:
            shutil.rmtree(d)
        if not any(dirs[0].parent.iterdir()):
            dirs[0].parent.rmdir()
    return rows


# Measured in `reps` interleaved rounds (uniform, stock, uniform, stock, ...), each run
# started with all five inputs in the page cache: their ratio is the target.
PAIRED = ("uniform", "stock")


def paired(
    size: str, argvs: dict[str, list[str]], reps: int, work: Path, env: dict[str, str],
    dirs: list[Path],
) -> list[dict]:  # fmt: skip
    """Uniform and stock, `reps` rounds, interleaved; one row each: median wall, max peak,
    every round's wall in `reps_s`. Before each run a `cat` (not timed) of the five inputs
    to /dev/null puts them all in the page cache: both recipes start from the same state."""
    runs: dict[str, list[dict]] = {name: [] for name in argvs}
    files = [str(d / "model.safetensors") for d in dirs]
    for _ in range(reps):
        for name in argvs:
            t0 = time.monotonic()  # seconds, not a minute: they were all in the page cache
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
            warm = time.monotonic() - t0
            runs[name].append({**measure_one(size, name, argvs[name], work, env, dirs[:4]),
                               "warm_s": warm})  # fmt: skip
    rows = []
    for got in runs.values():
        row = dict(got[len(got) // 2])
        row["wall_s"] = statistics.median(r["wall_s"] for r in got)
        row["peak_anon"] = max(r["peak_anon"] for r in got)
        row["rc"] = max((r["rc"] for r in got), key=abs)
        row["reps_s"] = [r["wall_s"] for r in got]
        row["warm_s"] = [r["warm_s"] for r in got]
        rows.append(row)
    return rows


def measure_one(
    size: str, name: str, argv: list[str], work: Path, env: dict[str, str], fine: list[Path]
) -> dict:
    """One run in a fresh process; its outputs, reports and histories deleted after."""
    shape = SIZES[size]
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
    for p in work.iterdir():  # outputs, reports, histories
        if p.name not in ("eval.py",):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return row


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
    p.add_argument("--inputs", default=str(CACHE),
                   help="folder of <size>-bf16/m00..m04 input folders: complete ones are "
                   "reused (read only), missing ones generated there")  # fmt: skip
    p.add_argument(
        "--keep-inputs",
        action="store_true",
        help="keep the inputs this run generated (found ones are always kept)",
    )
    p.add_argument("--reps", type=int, default=2,
                   help="interleaved rounds of uniform and stock (medians reported)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "scale"))
    p.add_argument(
        "--rows",
        default=None,
        help="results JSON of an earlier run: its rows of other sizes are kept",
    )
    p.add_argument("--snapshot", default="HEAD", help="git ref whose src/ runs ('' = work tree)")
    args = p.parse_args()
    args.skip = [s for s in args.skip.split(",") if s]
    if args.reps < 1:
        p.error("--reps must be at least 1")
    # SOUP_UNSUPERVISED: `soup` would otherwise fork after its imports and wait for the
    # child; the tree's RssAnon would count the pages they share (torch) twice.
    ref = args.snapshot or "HEAD"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    src = ROOT / "src" if not args.snapshot else snapshot(commit)
    env = {**os.environ, "PYTHONPATH": str(src), "SOUP_UNSUPERVISED": "1"}
    base = baseline(env)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    rows: list[dict] = []
    if args.rows:  # sizes measured by an earlier run of the same snapshot
        earlier = json.loads(Path(args.rows).read_text())
        rows = [r for r in earlier["rows"] if r["size"] not in args.sizes.split(",")]
    for size in args.sizes.split(","):
        rows += bench_size(size, args, env)
    header = (f"# Model-size axis (issue 13)\n\nCommit {commit}, {started}, "
              f"{(time.monotonic() - t0) / 60:.1f} min, load {os.getloadavg()[0]:.1f} at the "
              f"end; bf16 Llama folders, N=4; inputs in {args.inputs}.\n\n")  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, "baseline": base,
                                                    "rows": rows}, indent=1))  # fmt: skip
    out.with_suffix(".md").write_text(header + table(rows, base))
    plot(rows, base, out.with_suffix(".png"))
    print(header + table(rows, base))


if __name__ == "__main__":
    main()
