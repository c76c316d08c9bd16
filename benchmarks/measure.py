"""Run one command in a fresh process and measure wall time and peak anonymous memory.

Peak memory is the largest *sum* of ``RssAnon`` over the process and all its descendants,
sampled from ``/proc`` every ~20 ms. ``ru_maxrss`` would be wrong here: it also counts
file-backed pages of memory-mapped inputs (page cache), which grows with N for any mmap
reader without costing anyone real memory. A 20 ms sampler can miss a spike shorter than
that; every method is measured the same way, so the comparison stays fair.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_S = 0.02


@dataclass
class Measurement:
    wall_s: float
    peak_anon_bytes: int
    returncode: int
    samples: int
    stderr_tail: str = ""
    stdout: str = ""
    cpu_user_s: float = 0.0  # CPU time of the process and its waited-for descendants
    cpu_sys_s: float = 0.0  # high sys time here is mostly page faults on mmapped inputs
    extra: dict[str, object] = field(default_factory=dict)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` over all its threads (needs CONFIG_PROC_CHILDREN)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # exited between listing and reading, or a zombie


def tree_rss_anon(root: int) -> int:
    """Sum of RssAnon over ``root`` and every descendant alive right now."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_anon(pid)
        stack.extend(_children(pid))
    return total


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 1800.0,
    stdout_devnull: bool = True,
) -> Measurement:
    """Run ``cmd`` to completion; return wall time, peak tree RssAnon and exit code."""
    peak = 0
    samples = 0
    done = threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if stdout_devnull else subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def sample() -> None:
        nonlocal peak, samples
        while not done.is_set():
            peak = max(peak, tree_rss_anon(proc.pid))
            samples += 1
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the harness runs one child at a time
    done.set()
    sampler.join()
    tail = err.decode(errors="replace")[-2000:] if err else ""
    text = out.decode(errors="replace") if out else ""
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return Measurement(wall, peak, proc.returncode, samples, tail, text, user, sys_)
