"""Run independent jobs on Ray: a local Ray runtime or an existing cluster.

`RayExecutor` has the API of `LocalExecutor` (see `executor.py`):
`map(fn, items) -> [fn(item) for item in items]`, results in item order, the first error
(in item order) re-raised in the caller as the exception `fn` raised. Each item is one Ray
task that asks for `num_cpus_per_task` CPUs (default 1), so a cluster runs as many
evaluations at once as it has CPUs, and Ray's scheduler does the rest. Tasks are submitted
as earlier ones are collected, at most twice as many as the cluster runs at once.

How checkpoints reach the workers:
- By path (the default, and what `--ray` / `--ray-address` do). Recipes hand executors
  checkpoint *paths*, never tensors: each task opens the files itself, lazily, as a local
  worker process would. That needs a shared filesystem — the same path must name the same
  file on every node (NFS, a cluster's shared disk, or simply one machine, which is what
  `--ray` without `--ray-address` starts). Tasks run in the caller's working directory when
  the node has that folder, so relative paths and `--eval` commands mean the same there.
- Through Ray's object store, for small models on a cluster without a shared filesystem:
  `RayExecutor(address, ship_files=True)` reads each `pathlib.Path` found in the items (a
  file, or a model folder; plain strings are left alone, since they may be names) once on
  the driver, puts its bytes in the object store (`ray.put`, once per path however many
  items name it), and each task writes them to a temporary folder on its node and calls
  `fn` with that local path. Checkpoints bigger than `max_ship_bytes` (default 2 GB) are an
  error: put those on a shared filesystem.
- Items that are in-memory state dicts always go through the object store (Ray moves any
  large task argument that way): `greedy_soup([sd1, sd2, ...], ..., executor=RayExecutor())`.

Ray is an optional dependency: `pip install 'modelsoups[ray]'`.

Example:
    >>> with RayExecutor(num_cpus=2) as ex:  # doctest: +SKIP
    ...     ex.map(abs, [-1, -2, 3])
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import SoupError

if TYPE_CHECKING:
    from .executor import LocalExecutor

__all__ = ["RayExecutor", "import_ray", "init_local_ray", "make_executor"]

T = TypeVar("T")
R = TypeVar("R")

INSTALL = "pip install 'modelsoups[ray]'"


def import_ray() -> Any:
    """`import ray`, or a `SoupError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise SoupError(
            f"Ray is not installed ({e}); install it with: {INSTALL}  "
            "(or drop --ray to evaluate with local processes)"
        ) from None
    return ray


class _Shipped:
    """Marks a checkpoint path whose bytes travel in the object store (see module doc)."""

    def __init__(self, ref: Any, name: str) -> None:
        self.ref, self.name = ref, name


def _pack(path: Path, limit: int) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    if size > limit:
        raise SoupError(
            f"{path}: {size:,} bytes is more than max_ship_bytes={limit:,} to send through "
            "Ray's object store; put the checkpoints on a filesystem every node shares and "
            "use ship_files=False"
        )
    root = path.parent if path.is_file() else path
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _unpack(item: Any, workdir: Path) -> Any:
    """Write shipped checkpoints into `workdir`; the item with local paths in their place."""
    if isinstance(item, _Shipped):
        import ray

        files: dict[str, bytes] = ray.get(item.ref)
        target = workdir / f"{len(list(workdir.iterdir()))}"
        for rel, data in files.items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(data)
        single = len(files) == 1 and next(iter(files)) == item.name
        return target / item.name if single else target
    if isinstance(item, tuple):
        return tuple(_unpack(x, workdir) for x in item)
    if isinstance(item, list):
        return [_unpack(x, workdir) for x in item]
    return item


def _run(fn: Callable[[Any], Any], item: Any, cwd: str) -> Any:
    """The body of one Ray task: in the driver's folder (when this node has it, as on a
    shared filesystem, so that relative paths and eval commands mean what they mean for
    the caller), with shipped files materialised."""
    before = os.getcwd()
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    try:
        if not _has_shipped(item):
            return fn(item)
        workdir = Path(tempfile.mkdtemp(prefix="soup-ray-"))
        try:
            return fn(_unpack(item, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        os.chdir(before)


def _has_shipped(item: Any) -> bool:
    if isinstance(item, _Shipped):
        return True
    return isinstance(item, tuple | list) and any(_has_shipped(x) for x in item)


class RayExecutor:
    """Runs `fn` on every item as Ray tasks; results in item order.

    Args:
        address: an existing cluster (`ray://host:10001`, `host:6379` or `auto`); `None`
            starts a local Ray runtime on this machine, listening on loopback only (or
            reuses the one this process already started).
        num_cpus: CPUs of the local runtime (`None`: all); ignored with `address`.
        num_cpus_per_task: CPUs each task reserves (an evaluation that uses 4 threads: 4).
        ship_files: send `pathlib.Path` items through the object store instead of relying
            on a shared filesystem (see the module docstring).
        max_ship_bytes: refuse to ship checkpoints bigger than this.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        num_cpus_per_task: float = 1,
        ship_files: bool = False,
        max_ship_bytes: int = 2_000_000_000,
    ) -> None:
        self.ray = import_ray()
        self.address, self.num_cpus = address, num_cpus
        self.num_cpus_per_task = num_cpus_per_task
        self.ship_files = ship_files
        self.max_ship_bytes = max_ship_bytes
        self._started = False

    def _init(self) -> None:
        if self.ray.is_initialized():
            return
        try:
            if self.address is None:
                init_local_ray(self.num_cpus)
            else:
                with _signal_handlers_kept():
                    self.ray.init(address=self.address, include_dashboard=False,
                                  log_to_driver=False, logging_level=logging.ERROR)  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "a local runtime"
            raise SoupError(f"cannot start Ray on {where}: {str(e).splitlines()[0]}") from None
        self._started = True

    def _ship(self, item: Any, refs: dict[Path, _Shipped]) -> Any:
        if isinstance(item, Path) and item.exists():
            if item not in refs:
                payload = _pack(item, self.max_ship_bytes)
                refs[item] = _Shipped(self.ray.put(payload), item.name)
            return refs[item]
        if isinstance(item, tuple):
            return tuple(self._ship(x, refs) for x in item)
        if isinstance(item, list):
            return [self._ship(x, refs) for x in item]
        return item

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        if not items:
            return []
        self._init()
        task = self.ray.remote(num_cpus=self.num_cpus_per_task, max_retries=0)(_run)
        refs: dict[Path, _Shipped] = {}
        sent = [self._ship(x, refs) for x in items] if self.ship_files else items
        fn_ref = self.ray.put(fn)  # one copy of fn (and what it closes over) for all tasks
        window = self._window()
        futures: list[Any] = []
        results: list[R] = []
        try:
            for x in sent:  # submitted (its argument serialized) once a place frees up
                if len(futures) - len(results) >= window:
                    results.append(self.ray.get(futures[len(results)]))
                futures.append(task.remote(fn_ref, x, os.getcwd()))
            for future in futures[len(results) :]:
                results.append(self.ray.get(future))
        except self.ray.exceptions.RayError as e:  # a task raised, or its worker died
            self._cancel_pending(futures)
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise SoupError(f"a Ray task failed: {str(e).strip().splitlines()[0]}") from None
        except BaseException:  # Ctrl-C or SIGTERM: stop the tasks, and the runtime we started
            self._cancel_pending(futures)
            self.shutdown()
            raise
        return results

    def _window(self) -> int:
        """Tasks submitted and not yet collected, at most: twice the tasks the cluster runs at
        once. Ray serializes a task's argument when it is submitted (an in-memory ingredient:
        a copy of its tensors in the object store), so N ingredients are never all copied
        at once."""
        cpus = float(self.ray.cluster_resources().get("CPU", 1))
        return max(2, 2 * int(cpus / self.num_cpus_per_task))

    def _cancel_pending(self, futures: list[Any], wait: float = 0.0) -> None:
        """Stop the tasks that have not finished (finished ones are left alone): each gets
        a KeyboardInterrupt, so the eval command it runs is killed (evaluate.py); `wait`
        seconds at most for them to end."""
        _, pending = self.ray.wait(futures, num_returns=len(futures), timeout=0)
        for f in pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(f)
        if pending and wait > 0:
            with contextlib.suppress(Exception):
                self.ray.wait(pending, num_returns=len(pending), timeout=wait)

    def shutdown(self) -> None:
        """Stop the local runtime if this executor started it (a cluster keeps running)."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        where = self.address or f"local, num_cpus={self.num_cpus}"
        return f"RayExecutor({where})"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make Ray's node address 127.0.0.1 and keep the runtime from reporting usage stats.

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's routable address unless
    clusters are disabled, which is what its `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does (read
    at import, so the constant is set too); the processes `ray.init` starts inherit the
    environment. `RAY_USAGE_STATS_ENABLED` is only set when the user has not set it.
    """
    from ray._private import ray_constants

    names = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")
    env, flag = {n: os.environ.get(n) for n in names}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ[names[0]], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    os.environ.setdefault(names[1], "0")
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a Ray runtime on this machine that listens on loopback only (no dashboard).

    Nothing outside this machine can join or reach it: it is for `--ray` on one machine.
    """
    ray = import_ray()
    with _loopback_only(), _signal_handlers_kept():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, _node_ip_address="127.0.0.1")  # fmt: skip


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back this process's SIGTERM and SIGINT handlers after `ray.init`.

    Ray's core worker installs a C-level SIGTERM handler in the driver that prints a stack
    dump and aborts: `soup` would die of SIGABRT, with a page of Ray's log, instead of
    stopping its tasks, removing its temporaries and exiting 130 with one line."""
    import threading

    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in kept.items():
                if handler is not None:  # None: set from C, cannot be put back
                    signal.signal(s, handler)


def make_executor(
    workers: int = 1, *, ray: bool = False, ray_address: str | None = None
) -> LocalExecutor | RayExecutor:
    """What the CLI's `--workers N`, `--ray` and `--ray-address ADDR` ask for.

    `--ray` starts a local Ray runtime with `workers` CPUs (all CPUs when `workers` is 1);
    `--ray-address` connects to an existing cluster (and implies `--ray`).
    """
    from .executor import MAX_WORKERS, LocalExecutor

    if not 1 <= workers <= MAX_WORKERS:
        LocalExecutor(workers)  # the one-line error, for Ray's CPUs as for processes
    if ray or ray_address is not None:
        return RayExecutor(ray_address, num_cpus=workers if workers > 1 else None)
    return LocalExecutor(workers)
