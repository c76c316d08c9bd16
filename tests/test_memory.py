"""Bounded memory, measured: the uniform soup's peak memory does not grow with N.

The soup of N=2 and of N=8 same-size checkpoints (safetensors, then `.bin` pickles) runs in a
fresh child process each, writing a sharded folder. What is measured is the peak of
*anonymous* resident memory (RssAnon in /proc/PID/status: heap, accumulators, torch
allocations), sampled by a thread every half millisecond and, deterministically, at every
tensor write (when the accumulator is alive).

Why not ru_maxrss: the readers memory-map their inputs, and mapped file pages that were read
count in RSS (RssFile) until unmapped, so ru_maxrss can grow with N (393 -> 472 MiB in one
run) even though those pages are page cache the kernel can drop at will; when the imports'
peak is higher it hides the soup altogether. The test prints it for comparison.

Stated bound: peak RssAnon above the pre-soup baseline ≤ 2 × the largest tensor + 8 MiB (the
stream keeps at most two float32 accumulators in flight, one per worker thread; the inputs
hold two tensors of the largest size so that both can be), and N=8 exceeds N=2 by at most
8 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MiB = 1 << 20
LARGEST = 8 * MiB  # two 8 MiB float32 tensors (so that two accumulators can be in flight)
SMALL = 1 * MiB  # ... and six of 1 MiB: 22 MiB per checkpoint
SHARD = "8MB"

CHILD = textwrap.dedent(
    """
    import json, resource, sys, threading, time

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    import torch
    from modelsoups.io import writer
    from modelsoups.stream import average_checkpoints

    peak, done = [0], [False]

    def sample():
        peak[0] = max(peak[0], status("RssAnon"))

    def sampler():
        while not done[0]:
            sample()
            time.sleep(0.0005)

    original = writer.ShardedWriter.write

    def write(self, name, tensor):
        sample()  # the accumulator of this tensor is alive right now
        original(self, name, tensor)

    writer.ShardedWriter.write = write
    out, max_shard, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    baseline = status("RssAnon")
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    average_checkpoints(inputs, out, max_shard_size=max_shard)
    sample()
    done[0] = True
    thread.join()
    print(json.dumps({
        "baseline": baseline,
        "peak_anon": peak[0],
        "vm_hwm": status("VmHWM"),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    """
)


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def eight_checkpoints(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Eight fine-tunes of one base, 22 MiB each, written once for both runs: safetensors
    files, or PyTorch pickles (`.bin`, read through torch.load's mmap)."""
    fmt = request.param
    folder = tmp_path_factory.mktemp(f"memory-{fmt}")
    g = torch.Generator().manual_seed(0)
    base = {f"big{i}.weight": torch.randn(LARGEST // 4, generator=g) for i in range(2)}
    base |= {f"layer{i}.weight": torch.randn(SMALL // 4, generator=g) for i in range(6)}
    paths = []
    for i in range(8):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(folder / f"run{i}.{fmt}")
        save_file(sd, paths[-1]) if fmt == "safetensors" else torch.save(sd, paths[-1])
    return paths


def measure(inputs: list[Path], out: Path) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(8 * 10**6), *map(str, inputs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["baseline"]:
        pytest.skip("this kernel's /proc/PID/status has no RssAnon (Linux < 4.5)")
    assert sorted(out.glob("model-*.safetensors")), "expected a sharded output"
    return result


@pytest.mark.slow  # two children that import torch: ~5-10 s on 2 busy cores
def test_peak_memory_does_not_grow_with_n(eight_checkpoints: list[Path], tmp_path: Path) -> None:
    two = measure(eight_checkpoints[:2], tmp_path / "soup2")
    eight = measure(eight_checkpoints, tmp_path / "soup8")
    grow2 = two["peak_anon"] - two["baseline"]
    grow8 = eight["peak_anon"] - eight["baseline"]
    print(
        f"\npeak RssAnon above baseline: N=2 {grow2 / MiB:.1f} MiB, N=8 {grow8 / MiB:.1f} MiB "
        f"(largest tensor {LARGEST / MiB:.0f} MiB); ru_maxrss N=2 {two['ru_maxrss'] / MiB:.0f} "
        f"MiB, N=8 {eight['ru_maxrss'] / MiB:.0f} MiB (includes mapped input pages)"
    )
    assert grow8 - grow2 <= 8 * MiB
    for grow in (grow2, grow8):
        assert grow <= 2 * LARGEST + 8 * MiB
