"""Reference merge implementations, each run by the harness in a fresh process.

    python benchmarks/methods.py baseline                     # interpreter + torch import
    python benchmarks/methods.py memmap  OUT IN.safetensors…  # compute limit (numpy memmap)
    python benchmarks/methods.py naive   OUT IN.safetensors…  # load all, stack, mean, save
    python benchmarks/methods.py check   OUT IN.safetensors…  # max |OUT - fp64 mean|
    python benchmarks/methods.py greedy  OUT IN…              # greedy step vs re-average

``memmap`` is the compute lower bound of issue 5: one pass over memory-mapped inputs,
float32 accumulation, single thread, no output written. ``naive`` is what a user would
write first with safetensors + torch.
"""

from __future__ import annotations

import itertools
import json
import struct
import sys
import time

import numpy as np


def read_header(path: str) -> tuple[dict[str, dict[str, object]], int]:
    """Return a safetensors file's tensor table and the offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _views(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """Name → (dtype tag, flat uint8 view into the memory-mapped file)."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        offsets: list[int] = info["data_offsets"]  # type: ignore[assignment]
        begin, end = offsets
        out[name] = (str(info["dtype"]), mm[start + begin : start + end])
    return out


def _as_f32(tag: str, raw: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """View or convert one tensor's bytes to float32 (bf16 via a 16-bit shift)."""
    if tag == "F32":
        return raw.view(np.float32)
    if tag == "F16":
        return raw.view(np.float16).astype(np.float32)
    if tag == "BF16":
        wide = scratch[: raw.size // 2]
        np.left_shift(raw.view(np.uint16), 16, out=wide, dtype=np.uint32)
        return wide.view(np.float32)
    raise ValueError(f"memmap reference does not handle dtype {tag}")


def memmap_sum(out: str, paths: list[str]) -> None:
    del out  # the compute limit writes nothing
    files = [_views(p) for p in paths]
    largest = max(raw.size for _, raw in files[0].values())
    scratch = np.empty(largest // 2 + 1, dtype=np.uint32)
    for name, (tag, raw) in files[0].items():
        acc = np.array(_as_f32(tag, raw, scratch), dtype=np.float32, copy=True)
        for other in files[1:]:
            t2, r2 = other[name]
            np.add(acc, _as_f32(t2, r2, scratch), out=acc)
        acc *= 1.0 / len(files)


def naive(out: str, paths: list[str]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    states = [load_file(p) for p in paths]
    merged = {}
    for name, first in states[0].items():
        stacked = torch.stack([sd[name] for sd in states]).float()
        merged[name] = stacked.mean(0).to(first.dtype)
    save_file(merged, out)


def check(out: str, paths: list[str]) -> None:
    """Print JSON: the largest |output - float64 mean of inputs| over all tensors."""
    result = _views(out)
    worst, worst_name = 0.0, ""
    inputs = [_views(p) for p in paths]
    scratch = np.empty(max(r.size for _, r in inputs[0].values()) // 2 + 1, dtype=np.uint32)
    for name, (tag, raw) in inputs[0].items():
        if name not in result:
            print(json.dumps({"error": f"output lacks {name}"}))
            return
        acc = _as_f32(tag, raw, scratch).astype(np.float64)
        for other in inputs[1:]:
            acc += _as_f32(other[name][0], other[name][1], scratch)
        acc /= len(inputs)
        got = _as_f32(result[name][0], result[name][1], scratch).astype(np.float64)
        err = float(np.max(np.abs(got - acc))) if acc.size else 0.0
        if err > worst:
            worst, worst_name = err, name
    print(json.dumps({"max_abs_err": worst, "worst_tensor": worst_name}))


def greedy(out: str, paths: list[str]) -> None:
    """Print JSON: one greedy-soup step (incremental candidate) vs a re-average from scratch.

    Every candidate is accepted (the evaluator's score only grows), so the loop runs all
    N-1 steps; a step is the time between two evaluator calls: add the last ingredient to
    the running sum, build and materialise the next candidate. The re-average is the
    library's `uniform` over all N inputs in the same process (no start-up cost).
    """
    import importlib

    from modelsoups import uniform

    greedy_soup = None
    for mod_name in ("modelsoups", "modelsoups.recipes.greedy", "modelsoups.greedy"):
        try:
            greedy_soup = getattr(importlib.import_module(mod_name), "greedy_soup", None)
        except ImportError:
            continue
        if greedy_soup is not None:
            break
    if greedy_soup is None:
        print(json.dumps({"status": "missing"}))
        return
    stamps: list[float] = []

    def score(_state_dict: dict[str, object]) -> float:
        stamps.append(time.perf_counter())
        return float(len(stamps))

    names = [f"m{k:02d}" for k in range(len(paths))]
    given = {name: 1.0 - 1e-3 * k for k, name in enumerate(names)}  # keeps input order
    t0 = time.perf_counter()
    result = greedy_soup(paths, score, names=names, scores=given)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    t1 = time.perf_counter()
    uniform(paths, out)
    reaverage = time.perf_counter() - t1
    if not steps:  # N=2 has one candidate and so no interval between two of them
        print(json.dumps({"status": "needs N >= 3", "reaverage_s": reaverage}))
        return
    step = sorted(steps)[len(steps) // 2]
    print(json.dumps({
        "status": "timed", "n": len(paths), "selected": len(result.selected),
        "greedy_total_s": total, "step_median_s": step, "steps_s": steps,
        "reaverage_s": reaverage, "reaverage_over_step": reaverage / step,
    }))  # fmt: skip


def baseline() -> None:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    time.sleep(0.3)  # stay alive long enough for the 20 ms sampler to see the peak


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "baseline":
        baseline()
        return
    funcs = {"memmap": memmap_sum, "naive": naive, "check": check, "greedy": greedy}
    funcs[cmd](sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
