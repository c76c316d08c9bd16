"""Greedy soup beyond RAM: two designs for the soup's sum, measured side by side (issue 13).

A greedy step scores `(Σ soup + θ) / (k + 1)`. Where does `Σ soup` live when the model does
not fit in memory?

- `memmap`: a float32 running sum in a file of the work folder. A step reads the sum and θ,
  writes the next sum to a second file and the candidate to the evaluator's file; on
  acceptance the next sum is renamed over the sum. Scratch: two float32 models.
- `stream`: no running sum. A step reads the k soup members and θ again and writes the
  candidate. Scratch: none besides the candidate. Reads grow with the soup size k.

Both against `memory` (the running sum in RAM, as before) and the floor: `cat` of one
ingredient plus writing one candidate (`copy`). Every step here is accepted (soup sizes
1 → N-1). One process, warm page cache, numpy on one thread for all three, so that only the
data movement differs.

    python benchmarks/greedy_designs.py --size 250M --dtype bf16 --n 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_inputs import ensure_models

from modelsoups.average import CHUNK, _narrow, _scratch, widen
from modelsoups.io import open_checkpoint
from modelsoups.io.writer import Entry, OutputPlan, ShardedWriter


def write_candidate(path: Path, ckpt, tensor) -> None:  # type: ignore[no-untyped-def]
    """Write the candidate whose tensor `name` is `tensor(name)` (float32) in the inputs'
    dtype, as an evaluator's file."""
    entries = [Entry(n, i.dtype, i.shape) for n, i in ckpt.infos.items()]
    writer = ShardedWriter(path, OutputPlan(path, entries, {"format": "pt"}, False))
    out = np.empty(max(i.numel for i in ckpt.infos.values()), np.uint16)
    s = _scratch()
    for name, info in ckpt.infos.items():
        f32 = tensor(name).reshape(-1)
        o = out[: f32.size]
        for a in range(0, f32.size, CHUNK):
            _narrow(f32[a : a + CHUNK], o[a : a + CHUNK], info.dtype, s)
        writer.write(name, o.reshape(info.shape))
    writer.close()


def add_into(acc: np.ndarray, x: np.ndarray, dtype) -> None:  # type: ignore[no-untyped-def]
    wide = _scratch().wide
    for a in range(0, acc.size, CHUNK):
        b = min(a + CHUNK, acc.size)
        np.add(acc[a:b], widen(x[a:b], dtype, wide), out=acc[a:b])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="250M")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--work", default=None, help="scratch folder (default: benchmarks/.cache)")
    args = p.parse_args()
    dirs = ensure_models(args.size, args.dtype, args.n)
    files = [d / "model.safetensors" for d in dirs]
    ckpts = [open_checkpoint(f) for f in files]
    infos = ckpts[0].infos
    biggest = max(i.numel for i in infos.values())
    work = Path(tempfile.mkdtemp(prefix="greedy-designs-", dir=args.work or dirs[0].parent))
    cand = work / "candidate.safetensors"
    for f in files:  # warm the page cache
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    rows: dict[str, list[float]] = {}
    try:
        t = time.perf_counter()
        subprocess.run(["cat", str(files[0])], stdout=subprocess.DEVNULL, check=True)
        rows["cat one ingredient"] = [time.perf_counter() - t]
        t = time.perf_counter()
        write_candidate(cand, ckpts[0], lambda k: ckpts[0].get(k).float().numpy())
        rows["write one candidate"] = [time.perf_counter() - t]

        # memory: Σ in RAM (float32), next sum and candidate computed per tensor
        sums = {k: np.zeros(i.numel, np.float32) for k, i in infos.items()}
        for k, i in infos.items():
            add_into(sums[k], ckpts[0].array(k).reshape(-1), i.dtype)
        steps = []
        for j in range(1, args.n):
            t = time.perf_counter()

            def mem(k: str, j: int = j) -> np.ndarray:
                add_into(sums[k], ckpts[j].array(k).reshape(-1), infos[k].dtype)
                return sums[k] / (j + 1)

            write_candidate(cand, ckpts[0], mem)
            steps.append(time.perf_counter() - t)
        rows["memory (sum in RAM)"] = steps
        sums.clear()

        # memmap: Σ in a float32 file; the next Σ goes to a second file, renamed on accept
        offsets, total = {}, 0
        for k, i in infos.items():
            offsets[k] = total
            total += i.numel
        sum_path, next_path = work / "sum.f32", work / "next.f32"
        s = np.memmap(sum_path, np.float32, "w+", shape=(total,))
        for k, i in infos.items():
            o = offsets[k]
            s[o : o + i.numel] = 0
            add_into(s[o : o + i.numel], ckpts[0].array(k).reshape(-1), i.dtype)
        del s
        steps = []
        for j in range(1, args.n):
            t = time.perf_counter()
            s = np.memmap(sum_path, np.float32, "r", shape=(total,))
            nxt = np.memmap(next_path, np.float32, "w+", shape=(total,))

            def mm(k: str, j: int = j, s=s, nxt=nxt) -> np.ndarray:  # type: ignore[no-untyped-def]
                o, m = offsets[k], infos[k].numel
                wide, x = _scratch().wide, ckpts[j].array(k).reshape(-1)
                for a in range(0, m, CHUNK):
                    b = min(a + CHUNK, m)
                    np.add(s[o + a : o + b], widen(x[a:b], infos[k].dtype, wide),
                           out=nxt[o + a : o + b])  # fmt: skip
                return nxt[o : o + m] / (j + 1)

            write_candidate(cand, ckpts[0], mm)
            del s, nxt
            os.replace(next_path, sum_path)  # accepted
            steps.append(time.perf_counter() - t)
        rows["memmap (sum in a file)"] = steps
        sum_path.unlink()

        # stream: no sum; the soup's members are read again at every step
        buf = np.empty(biggest, np.float32)
        steps = []
        for j in range(1, args.n):
            t = time.perf_counter()

            def st(k: str, j: int = j) -> np.ndarray:
                acc = buf[: infos[k].numel]
                acc[:] = 0
                for c in ckpts[: j + 1]:
                    add_into(acc, c.array(k).reshape(-1), infos[k].dtype)
                return acc / (j + 1)

            write_candidate(cand, ckpts[0], st)
            steps.append(time.perf_counter() - t)
        rows["stream (no sum)"] = steps
    finally:
        for c in ckpts:
            c.close()
        shutil.rmtree(work)
    floor = rows["cat one ingredient"][0] + rows["write one candidate"][0]
    print(f"{args.size} {args.dtype}, N={args.n}, {len(infos)} tensors; seconds per step "
          f"(soup size 1..{args.n - 1}); floor = cat + write = {floor:.2f} s")  # fmt: skip
    for name, steps in rows.items():
        cells = " ".join(f"{x:6.2f}" for x in steps)
        print(f"  {name:24s} {cells}   (÷ floor: {' '.join(f'{x / floor:.2f}' for x in steps)})")


if __name__ == "__main__":
    main()
