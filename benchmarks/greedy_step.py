"""Where a greedy step's time goes (issue 13): one streamed step, taken apart, in one process.

A `soup greedy --eval CMD` step, as `bench_scale.py` times it, is: compute the candidate
`(Σ soup + θ) / (k + 1)` tensor by tensor, write it into a new temporary folder, start the
eval command, and (after it) append the step to the history and delete the candidate. Here
each part is timed alone on the same inputs, for soup sizes k = 1..N-1, next to the data
movement that bounds it: `cat` of one ingredient from the disk and from the page cache,
and single-thread numpy/torch kernels over as many elements as the model has.

    python benchmarks/greedy_step.py --size 250M          # inputs from make_inputs.py

Rows (wall seconds, CPU seconds of all threads in brackets):
- compute: the candidate's parts computed and rounded, passed to a sink that drops them;
- write scratch: compute + write as an eval command's candidate is now (`scratch=True`);
- write durable: compute + write as the final soup is (O_DIRECT, fsync) - how candidates
  were written before;
- rm: deleting the candidate folder after each of the two writes;
- eval: starting `python eval.py` on the candidate (it reads one small tensor);
- history: one fsynced record.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import EVAL, evict  # noqa: E402
from make_inputs import ensure_models  # noqa: E402

from modelsoups.candidate import write_candidate  # noqa: E402
from modelsoups.history import History, record  # noqa: E402
from modelsoups.io import open_checkpoint  # noqa: E402
from modelsoups.io.base import Checkpoint  # noqa: E402
from modelsoups.recipes.greedy_sum import StreamedSum  # noqa: E402


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU (all threads) seconds of `fn()`."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def step(
    store: StreamedSum, extra: Checkpoint, work: Path, model_files: Path, hist: History
) -> dict[str, tuple[float, float]]:
    """Each part of one step that tries `extra` on `store`'s soup, timed."""
    cand, out, times = store.candidate("c", extra), work / "candidate", {}
    env = {**os.environ, "BENCH_EVAL_LOG": str(work / "eval.jsonl")}
    cmd = f"{sys.executable} {work / 'eval.py'} {out}"

    def drop(first: int, part: np.ndarray) -> None:
        pass

    times["compute"] = timed(lambda: [cand.write_parts(n, drop) for n in cand.infos])
    for kind, scratch in (("scratch", True), ("durable", False)):
        times[f"write {kind}"] = timed(
            lambda s=scratch: write_candidate(cand, out, model_files_from=model_files, scratch=s)
        )
        if scratch:
            times["eval"] = timed(lambda: subprocess.run(cmd, shell=True, env=env, check=True,
                                                         capture_output=True))  # fmt: skip
        times[f"rm ({kind})"] = timed(lambda: shutil.rmtree(out))
    rec = record("greedy", str(extra.path), "held_out", 1.0, accepted=True, soup_size=2)
    times["history"] = timed(lambda: hist.append(rec))
    return times


def kernels(numel: int) -> dict[str, float]:
    """Single-thread seconds of each elementary pass over `numel` bf16/float32 elements,
    in the slices `_sum` uses (32M elements timed, scaled)."""
    import torch

    from modelsoups.average import CHUNK

    torch.set_num_threads(1)
    n = 32 << 20
    rng = np.random.default_rng(0)
    bits = (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(n, np.uint16)
    acc, wide = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
    narrow = torch.empty(CHUNK, dtype=torch.bfloat16)
    passes: dict[str, Callable[[int, int], object]] = {
        "memcpy bf16 (read 2 B, write 2 B)": lambda a, b: np.copyto(out[a:b], bits[a:b]),
        "widen bf16 -> float32 (a shift)": lambda a, b: np.left_shift(
            bits[a:b], 16, out=wide[: b - a].view(np.uint32), dtype=np.uint32
        ),
        "add float32": lambda a, b: np.add(acc[: b - a], wide[: b - a], out=acc[: b - a]),
        "divide by k + 1": lambda a, b: np.divide(acc[: b - a], 3, out=acc[: b - a]),
        "finite check (a sum)": lambda a, b: np.isfinite(np.add.reduce(acc[: b - a])),
        "round to bf16 (torch copy_)": lambda a, b: narrow[: b - a].copy_(
            torch.from_numpy(acc[: b - a])
        ),
    }
    acc[:] = 1.0
    result = {}
    for name, f in passes.items():
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for lo in range(0, n, CHUNK):
                f(lo, min(lo + CHUNK, n))
            best = min(best, time.perf_counter() - t)
        result[name] = best * numel / n
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="250M")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--work", default=None, help="folder for candidates (default: a temp)")
    args = p.parse_args()
    dirs = ensure_models(args.size, "bf16", args.n)
    files = [d / "model.safetensors" for d in dirs]
    one = files[1].stat().st_size
    load = [os.getloadavg()[0]]
    evict(files[1])
    cold, _ = timed(lambda: subprocess.run(["cat", str(files[1])], stdout=subprocess.DEVNULL))
    hot, _ = timed(lambda: subprocess.run(["cat", str(files[1])], stdout=subprocess.DEVNULL))
    for f in files:  # the soup's members are page-cached in a real run (read when scored)
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL)
    ckpts = [open_checkpoint(d) for d in dirs]
    numel = sum(i.numel for i in ckpts[0].infos.values())
    store = StreamedSum(ckpts[0], dirs[0])
    names = ["compute", "write scratch", "rm (scratch)", "write durable", "rm (durable)",
             "eval", "history"]  # fmt: skip
    parts: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="greedy-step-", dir=args.work) as tmp:
        work = Path(tmp)
        (work / "eval.py").write_text(EVAL)
        hist = History(work / "h.jsonl", resume=False, dataset="held_out")
        for k in range(1, args.n):
            for name, t in step(store, ckpts[k], work, dirs[0], hist).items():
                parts[name].append(t)
            store.add(ckpts[k])
            load.append(os.getloadavg()[0])
        hist.close()
    store.close()
    rows = list(parts.items())
    limit_disk, limit_cache = 1.5 * 2 * cold, 1.5 * 2 * hot
    print(f"# One greedy step taken apart: {args.size} bf16 ({numel / 1e6:.1f}M params, "
          f"{one / 1e9:.2f} GB an ingredient), streamed store\n")  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
          f"{min(load):.1f}-{max(load):.1f} (2 cores).\n")  # fmt: skip
    print(f"`cat` of one ingredient: {cold:.2f} s from the disk ({one / cold / 1e9:.2f} GB/s), "
          f"{hot:.2f} s from the page cache ({one / hot / 1e9:.1f} GB/s). Target for a step: "
          f"1.5 × (read + write one ingredient) = {limit_disk:.2f} s at the disk's speed, "
          f"{limit_cache:.2f} s at the page cache's.\n")  # fmt: skip
    ks = range(1, args.n)
    print("| part | " + " | ".join(f"soup of {k}: wall s (CPU s)" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name, values in rows:
        cells = " | ".join(f"{w:.2f} ({c:.2f})" for w, c in values)
        print(f"| {name} | {cells} |")
    print(
        f"\nSingle-thread passes over {numel / 1e6:.0f}M elements (the floor of the "
        "arithmetic; a step at soup size k does k + 1 widens, k adds, one of each other):\n"
    )
    print("| pass | s |\n|---|---|")
    for name, s in kernels(numel).items():
        print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
    main()
