"""`similarity.init_warning` (every soup runs it) against the all-pairs matrix, side by side.

    python benchmarks/bench_similarity.py --ns 100,500,2000 --tensors 60

N in-memory ingredients of `--tensors` tensors each, fine-tunes of one base (no warning:
the costliest case for a check that stops at the first bad pair). Prints, per N, the wall
time of sampling the vectors, of `init_warning`, and of `similarity_report(...).warning`
(the all-pairs matrix `soup inspect` prints), with their ratio and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from modelsoups.io import MemoryCheckpoint
from modelsoups.similarity import init_warning, sample_vector, similarity_report


def ingredients(n: int, tensors: int) -> list[MemoryCheckpoint]:
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(tensors)}

    def finetune() -> dict[str, torch.Tensor]:
        return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}

    return [MemoryCheckpoint(finetune(), f"<ft {i}>") for i in range(n)]


def seconds(f: object) -> float:
    start = time.perf_counter()
    f()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="100,500,2000")
    p.add_argument("--tensors", type=int, default=60)
    args = p.parse_args()
    print("| N | load | sample s | init_warning s | all pairs s | all pairs ÷ init_warning |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.ns.split(",")):
        ckpts = ingredients(n, args.tensors)
        load = os.getloadavg()[0]
        sample = seconds(lambda c=ckpts: [sample_vector(x, per_tensor=32) for x in c])
        fast = min(seconds(lambda c=ckpts: init_warning(c)) for _ in range(3))
        full = seconds(lambda c=ckpts: similarity_report(c, per_tensor=32).warning)
        assert init_warning(ckpts) is None and similarity_report(ckpts).warning is None
        print(f"| {n} | {load:.1f} | {sample:.2f} | {fast:.2f} | {full:.2f} | {full / fast:.1f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
