"""Where independent jobs run: the executor abstraction.

Scoring N ingredients on held-out data, an α sweep or fine-tuning N ingredients are N
independent jobs. Recipes hand them to an `Executor`, whose whole API is

    executor.map(fn, items) -> [fn(item) for item in items]    # same order as `items`

`LocalExecutor(workers)` runs them in a pool of local processes (spawn context: no forked
torch/OpenMP state, same behaviour on Linux, macOS and Windows); `workers=1` runs them inline,
in this process, which is also what the tests use. A Ray implementation (issue 7) has the same
shape. With more than one worker, `fn` and every item are pickled to the workers: `fn` must
be a module-level function (or a `functools.partial` of one) and items should be small —
pass checkpoint *paths* rather than tensors when you can. Items are pickled one by one as
workers free up (at most 2 × workers jobs waiting or running), so N in-memory ingredients
are never all copied at once. Exceptions raised by `fn` are re-raised in the caller (the
first one, in item order).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from .errors import SoupError

__all__ = ["Executor", "LocalExecutor", "get_executor"]

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 1024  # parallel evaluations; 10**30 would try to start that many processes


class Executor(Protocol):
    """Runs `fn` on every item, possibly in parallel, and returns results in item order."""

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...


class LocalExecutor:
    """A pool of `workers` local processes (spawn context); `workers=1` runs inline.

    Example:
        >>> LocalExecutor(2).map(abs, [-1, -2, 3])
        [1, 2, 3]
        >>> with LocalExecutor(2) as ex:  # one pool of processes for every map inside
        ...     ex.map(abs, [-1]) + ex.map(abs, [-2])
        [1, 2]
    """

    def __init__(self, workers: int = 1) -> None:
        if not 1 <= workers <= MAX_WORKERS:  # each is a process importing torch
            raise SoupError(f"workers must be from 1 to {MAX_WORKERS}, got {str(workers)[:40]}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        fn_bytes = _pickle(fn)  # work that cannot travel is refused before workers start
        first = [_Job(fn_bytes, _pickle(items[0]))]  # handed over, not kept here
        pool = self._pool or _pool(min(self.workers, len(items)))
        try:
            with _signals_deferred() as caught:
                futures = _submit_windowed(pool, fn_bytes, first, items, 2 * self.workers, caught)
            if caught:  # the handler in force before `map` decides: KeyboardInterrupt, ...
                signal.raise_signal(caught[0])
            return [f.result() for f in futures]  # the first error in item order is raised
        except BaseException:  # an error, Ctrl-C or SIGTERM: stop now, queued jobs too
            _stop(pool)
            self._pool = None
            raise
        finally:
            if pool is not self._pool:
                pool.shutdown(wait=True)

    def __enter__(self) -> LocalExecutor:
        """Keep one pool of worker processes for every `map` until the block ends, instead
        of starting (and importing torch in) fresh processes for each call."""
        if self.workers > 1 and self._pool is None:
            self._pool = _pool(self.workers)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if exc_type is not None:  # failed or interrupted: stop running jobs, do not wait
            _stop(pool)
        pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"


def _submit_windowed(
    pool: ProcessPoolExecutor,
    fn_bytes: bytes,
    first: list[_Job],
    items: Sequence[Any],
    window: int,
    caught: list[int],
) -> list[Future[Any]]:
    """Submit the jobs in item order, each pickled only when a place in the window of
    `window` unfinished jobs frees up: the pickled copies held at once (an in-memory
    ingredient pickles to a copy of its tensors) are bounded by the window, not by N.
    Returns the futures submitted: all of them, unless one failed or a signal came."""
    futures: list[Future[Any]] = []
    pending: set[Future[Any]] = set()
    job: _Job | None = first.pop()
    while (len(futures) < len(items) or pending) and not caught:
        while len(futures) < len(items) and len(pending) < window:
            if job is None:
                job = _Job(fn_bytes, _pickle(items[len(futures)]))
            futures.append(pool.submit(_run_pickled, job))
            pending.add(futures[-1])
            job = None  # the pool holds it until its result is in, then lets it go
        done, pending = wait(pending, 0.1, FIRST_COMPLETED)
        if any(f.exception() is not None for f in done):
            break
    return futures


class _Job:
    """One job on its way to a worker: `fn` and one item, each pickled here, in this thread.

    Failing to pickle inside the pool leaves its bookkeeping broken in Python 3.11 (a
    graceful shutdown then waits forever, and a forced one kills its manager thread with
    InvalidStateError); failing here is one `SoupError`, and the pool is stopped cleanly."""

    __slots__ = ("fn", "item")

    def __init__(self, fn: bytes, item: bytes) -> None:
        self.fn, self.item = fn, item


def _pickle(x: object) -> bytes:
    try:
        return pickle.dumps(x)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise SoupError(
            f"cannot send work to worker processes ({e}); with workers > 1, use "
            "module-level functions (not lambdas or closures), or workers=1"
        ) from e


def _run_pickled(job: _Job) -> Any:
    """In a worker: one job (its result's type is the job's `fn`'s)."""
    return pickle.loads(job.fn)(pickle.loads(job.item))


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """While the pool's futures are awaited, SIGINT and SIGTERM only note themselves.

    A KeyboardInterrupt raised at an arbitrary point inside concurrent.futures (between a
    lock's acquire and its `try`) can leave a future's lock held, and the pool's manager
    thread, and with it the exit of the process, then waits for it forever. Noted here, the
    signal is raised again, with the handler in force before, from one known place."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def note(signum: int, _frame: object) -> None:
        caught.append(signum)

    installed = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if None in installed.values():  # a handler set from C: it cannot be put back
        yield caught
        return
    previous = {s: signal.signal(s, note) for s in installed}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued jobs and terminate the workers: each kills the process groups of
    the commands it runs (`child_groups`) and exits, so nothing is left running. A worker
    that has not exited 5 s later is killed."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(OSError):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(5)
        if process.is_alive():
            with contextlib.suppress(OSError):
                process.kill()
            process.join(5)


# Process groups of the commands (eval commands) running in this process; a worker that is
# stopped or orphaned kills them first, since they live in sessions of their own.
child_groups: set[int] = set()


def kill_child_groups() -> None:
    for group in list(child_groups):
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)


def _exit_with_parent(parent: int) -> None:
    """In a worker: on SIGTERM, and as soon as the process that started the pool is
    gone (a parent killed with SIGKILL cannot stop its workers), kill the commands this
    worker runs and exit, instead of running the current job to its end."""

    def stop(signum: int = 0, _frame: object = None) -> None:
        kill_child_groups()
        os._exit(128 + signum if signum else 1)

    signal.signal(signal.SIGTERM, stop)
    # Ctrl-C reaches the whole process group: the parent alone takes it and stops the
    # workers (SIGTERM, above), instead of each worker dying under the pool's feet
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop()

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def get_executor(executor: Executor | int | None) -> Executor:
    """`None` → inline, an int → `LocalExecutor(n)`, an executor → itself."""
    if executor is None:
        return LocalExecutor(1)
    if isinstance(executor, int):
        return LocalExecutor(executor)
    return executor
