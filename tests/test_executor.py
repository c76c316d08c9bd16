"""LocalExecutor: order kept, worker processes reused in a with block, stopped on errors and
when their parent dies; greedy scored in workers equals greedy scored inline."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from distance_eval import distance_ingredients
from midrun import alive

from modelsoups import LocalExecutor
from modelsoups.errors import SoupError
from modelsoups.evaluate import CommandEvaluator


def test_local_executor_keeps_order_inline_and_in_processes() -> None:
    assert LocalExecutor(1).map(abs, [-3, 1, -2]) == [3, 1, 2]
    assert LocalExecutor(2).map(abs, [-3, 1, -2]) == [3, 1, 2]
    with pytest.raises(SoupError):
        LocalExecutor(0)


def test_local_executor_in_a_with_block_reuses_its_worker_processes() -> None:
    with LocalExecutor(2) as ex:
        first = ex.map(_pid, [1, 2, 3, 4])
        second = ex.map(_pid, [1, 2, 3, 4])
    assert len(set(first) | set(second)) <= 2  # fresh pools would start new processes
    assert os.getpid() not in first
    assert set(LocalExecutor(2).map(_pid, [1, 2])).isdisjoint(first)  # pool shut down


def test_local_executor_leaving_its_with_block_by_an_error_stops_running_jobs() -> None:
    with pytest.raises(KeyboardInterrupt), LocalExecutor(2) as ex:
        pids = set(ex.map(_pid, [1, 2, 3, 4]))
        threading.Thread(target=_map_quietly, args=(ex,), daemon=True).start()
        time.sleep(1.0)
        raise KeyboardInterrupt  # Ctrl-C while both workers are busy
    assert not any(alive(p) for p in pids)  # terminated, not left to finish their jobs


ORPHAN = """
import os, sys, time
from modelsoups import LocalExecutor

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    with LocalExecutor(2) as ex:
        print(*set(ex.map(pid, [1, 2, 3, 4])), flush=True)
        ex.map(time.sleep, [600, 600])
"""


@pytest.mark.slow  # spawns workers that import modelsoups
def test_local_executor_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    (tmp_path / "orphan.py").write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, "orphan.py"], cwd=tmp_path, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert pids
    os.kill(parent.pid, signal.SIGKILL)  # no chance to stop its workers itself
    parent.wait()
    deadline = time.monotonic() + 30
    living = set(pids)
    while living and time.monotonic() < deadline:
        living = {p for p in living if alive(p)}
        time.sleep(0.2)
    assert not living, f"workers {living} outlived their parent"


def _map_quietly(ex: LocalExecutor) -> None:
    with contextlib.suppress(Exception):  # the pool breaks when its workers are terminated
        ex.map(time.sleep, [600, 600])


def _pid(_: int) -> int:
    return os.getpid()


@pytest.mark.slow  # two spawned workers each import torch
def test_ingredients_scored_in_worker_processes_match_inline(tmp_path: Path) -> None:
    from modelsoups import greedy_soup

    paths = distance_ingredients(tmp_path, 3)
    ev = CommandEvaluator(f"{sys.executable} {tmp_path / 'ev.py'} {{ckpt}} {paths[0]}")
    inline = greedy_soup(paths, ev)
    pooled = greedy_soup(paths, ev, executor=LocalExecutor(2))
    assert pooled.selected == inline.selected and pooled.history == inline.history


def test_unpicklable_work_is_a_clear_error() -> None:
    with pytest.raises(SoupError, match="module-level functions"):
        LocalExecutor(2).map(lambda x: x, [1, 2])


def test_results_come_back_in_item_order_when_jobs_finish_out_of_order() -> None:
    items = [(i * 7) % 5 / 50 for i in range(12)]  # 12 jobs, a window of 4, uneven lengths
    assert LocalExecutor(2).map(_slept, items) == items


def _slept(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_unpicklable_item_after_workers_started_is_one_error_and_stops_the_pool(
    capfd: pytest.CaptureFixture[str],
) -> None:
    items: list[object] = [-1, -2, -3, -4, -5, -6, lambda: 0, -8]  # pickled once 5 are done
    with LocalExecutor(2) as ex:
        with pytest.raises(SoupError, match="module-level functions"):
            ex.map(abs, items)
        assert ex.map(abs, [-1, -2]) == [1, 2]  # a fresh pool, the stopped one left behind
    deadline = time.monotonic() + 30
    while _manager_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _manager_threads(), "a pool's manager thread never ended"
    err = capfd.readouterr().err
    assert "Exception in thread" not in err and "Traceback" not in err, err


def _manager_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]


class _Counted:
    """An item that, when the executor pickles it, counts the pickled jobs alive then."""

    live_jobs: ClassVar[list[int]] = []

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[type, tuple[int]]:
        from modelsoups.executor import _Job

        self.live_jobs.append(sum(type(o) is _Job for o in gc.get_objects()))
        return int, (self.value,)


def test_jobs_are_pickled_as_workers_free_up_not_all_up_front() -> None:
    """An in-memory ingredient pickles to a copy of its tensors: with N of them, the copies
    held at once are bounded by the window of 2 × workers jobs in flight, not by N."""
    _Counted.live_jobs.clear()
    items = [_Counted(i) for i in range(24)]
    assert LocalExecutor(2).map(_slow_square, items) == [i * i for i in range(24)]
    assert len(_Counted.live_jobs) == 24  # each item pickled once, in this process
    # at most 3 unfinished when the next is pickled (measured: 3), + 1 the pool's manager
    # thread may still name while it hands a result over, + 1 of margin
    assert max(_Counted.live_jobs) <= 5, _Counted.live_jobs  # eagerly: 0, 1, ..., 23


def _slow_square(x: int) -> int:
    time.sleep(0.1)  # slower than pickling the next item, so that jobs would pile up
    return x * x
