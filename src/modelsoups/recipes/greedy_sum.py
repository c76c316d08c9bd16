"""Where greedy soup keeps its soup: the candidates `(Σ soup + θ) / (k + 1)`, one pass each.

Two interchangeable stores, chosen by a memory budget (`choose_store`):

- `InMemorySum` (the fast path, for models that fit the budget): a float32 running sum of
  the soup in RAM. A candidate is computed into buffers reused at every step (no page
  faults), and an accepted candidate's sum becomes the soup's without reading θ again.
  Memory: three float32 copies of the model, 12 bytes per parameter (`in_memory_bytes`).
- `StreamedSum` (any size): no sum is kept. A candidate tensor is the mean of the soup's
  members and θ, read from their (memory-mapped) files tensor by tensor into a fresh
  array that the caller frees. Memory: a few copies of the largest tensor. Scratch disk:
  none, besides the candidate file a command evaluator reads.

Why not a float32 running sum in a memory-mapped work file, swapped by rename on
acceptance? Measured side by side (`benchmarks/greedy_designs.py`, 245M bf16 params, soup
sizes 1-3, seconds per step on a loaded machine): RAM 7.8/8.9/7.0, file sum 13.4/10.5/17.6,
re-reading the members 11.0/10.7/11.5. The file sum was the slowest: every step writes the
next sum (2× the candidate's bytes for bf16 inputs) besides the candidate, and it needs two
float32 models of scratch disk; re-reading page-cached inputs costs a fraction of writing.

Both compute the same float32 arithmetic in the same order (first member, then each later
one, then θ, then a division by k + 1), so their candidates and soups are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..average import CHUNK, check_finite, widen, widen_buffer
from ..candidate import LazyCheckpoint
from ..dtypes import BF16, F32, DType, to_numpy
from ..io.base import Checkpoint, TensorInfo
from ..io.scratch import Sink

__all__ = [
    "DEFAULT_MEMORY",
    "InMemorySum",
    "SoupStore",
    "StreamedSum",
    "choose_store",
    "in_memory_bytes",
]

DEFAULT_MEMORY = 2 << 30  # 2 GiB: the in-memory sums of models up to ~179M parameters

Term = tuple[np.ndarray, DType]  # a flat array in its dtype's storage type, and the dtype


def in_memory_bytes(infos: dict[str, TensorInfo]) -> int:
    """Bytes `InMemorySum` holds: the sum, the next sum and the candidate in float32, and
    a copy of the integer tensors."""
    return sum(12 * i.numel if i.is_float else i.nbytes for i in infos.values())


def choose_store(
    first: Checkpoint,
    model_files_from: Path | None,
    memory: int,
    allow_nonfinite: bool = False,
    threads: int = 2,
) -> SoupStore:
    """`InMemorySum` if its buffers fit in `memory` bytes, else `StreamedSum`."""
    kind = InMemorySum if in_memory_bytes(first.infos) <= memory else StreamedSum
    return kind(first, model_files_from, allow_nonfinite=allow_nonfinite, threads=threads)


class SoupStore:
    """The soup (its members, in the order they were added) and its candidates."""

    kind = ""  # "memory" or "streamed", for reports

    def __init__(
        self,
        first: Checkpoint,
        model_files_from: Path | None,
        *,
        allow_nonfinite: bool = False,
        threads: int = 2,
    ) -> None:
        self.infos, self.folder, self.check = first.infos, model_files_from, not allow_nonfinite
        self.floats = [k for k, i in self.infos.items() if i.is_float]
        self.members = [first]
        self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(threads)
        self.threads = threads

    @property
    def size(self) -> int:
        return len(self.members)

    def candidate(self, label: str, extra: Checkpoint) -> LazyCheckpoint:
        """The soup plus `extra`, computed tensor by tensor when read."""
        raise NotImplementedError

    def add(self, ckpt: Checkpoint) -> None:
        """Add ingredient `ckpt` to the soup."""
        self.members.append(ckpt)

    def soup(self, label: str) -> LazyCheckpoint:
        """The soup itself, in fresh tensors that the caller keeps (on one thread: it is
        read after `close`)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the threads (the soup from `soup` stays readable)."""
        if self.pool is not None:
            self.pool.shutdown()
        self.pool = None

    # Over 60 lines: one slice loop serves the three destinations (the running sum, the
    # mean, a candidate's scratch file) so that each input slice is read exactly once.
    def _sum(
        self,
        k: str,
        out: np.ndarray | None,
        terms: list[Term],
        *,
        start: np.ndarray | None = None,
        mean: np.ndarray | None = None,
        sink: Sink | None = None,
        n: int = 1,
        members: Sequence[Checkpoint] = (),
    ) -> None:
        """`out = start + Σ terms` in float32, left to right (without `start`: the first
        term widened, then the others); then `out / n` into `mean` (which may be `out`), or
        rounded to the declared dtype as torch's `.to` does and passed to `sink(first,
        part)` a slice at a time (`out` may then be None: a slice of scratch per thread),
        checked: a NaN, Inf or float16 overflow raises `NonFiniteError` naming the input
        among `members` that holds one. Slice by slice, split across the threads."""
        dtype, size = self.infos[k].dtype, self.infos[k].numel
        flat_out = None if out is None else out.reshape(-1)
        flat_mean = None if mean is None else mean.reshape(-1)
        flat_start = None if start is None else start.reshape(-1)
        flats = [(x.reshape(-1), d) for x, d in terms]
        finite = [True]

        def part(lo: int, hi: int) -> None:
            wide, m = widen_buffer(), min(CHUNK, hi - lo)
            scratch = np.empty(m, np.float32) if flat_out is None else None
            quot = np.empty(m, np.float32) if sink and flat_out is not None else None
            narrow = torch.empty(m, dtype=dtype.to_torch()) if sink and dtype != F32 else None
            for a in range(lo, hi, CHUNK):
                b = min(a + CHUNK, hi)
                acc = scratch[: b - a] if scratch is not None else flat_out[a:b]  # type: ignore[index]
                rest, prev = flats, None
                if flat_start is None:  # bf16 is widened into `acc` itself (no copy)
                    x, d = flats[0][0][a:b], flats[0][1]
                    if d != BF16:
                        np.copyto(acc, widen(x, d, wide), casting="unsafe")
                    else:
                        widen(x, d, acc)
                    rest = flats[1:]
                else:
                    prev = flat_start[a:b]
                for x, d in rest:
                    np.add(acc if prev is None else prev, widen(x[a:b], d, wide), out=acc,
                           dtype=np.float32)  # fmt: skip
                    prev = None
                if flat_mean is not None:
                    np.divide(acc, n, out=flat_mean[a:b])
                    finite[0] = _finite(flat_mean[a:b], dtype) and finite[0]
                elif sink is not None:  # the mean in scratch (`out` keeps the sum), rounded
                    q = acc if quot is None else quot[: b - a]
                    np.divide(acc, n, out=q)
                    finite[0] = _finite(q, dtype) and finite[0]
                    if narrow is None:
                        sink(a, q)
                    else:
                        narrow[: b - a].copy_(torch.from_numpy(q))
                        sink(a, to_numpy(narrow[: b - a]))

        _in_slices(self.pool, self.threads, size, part)
        if self.check and not finite[0]:
            check_finite(k, dtype, members)


class InMemorySum(SoupStore):
    """Σθ over the soup in float32 (integer tensors: the first's), and candidates from it.

    A candidate `(Σθ + θₖ)/(k+1)` is computed in one pass per tensor, `next = sum + θₖ`,
    `mean = next / (k+1)`, into `next_sums` and `means` buffers allocated once and reused at
    every step (fresh memory would be page-faulted in every time). If the candidate is
    accepted, `sums` and `next_sums` swap: θₖ is not read a second time. So a candidate's
    tensors are only valid until the next candidate is computed.
    """

    kind = "memory"

    def __init__(self, first: Checkpoint, model_files_from: Path | None, **options: Any) -> None:
        super().__init__(first, model_files_from, **options)
        self.sums = {k: np.empty(self.infos[k].shape, np.float32) for k in self.floats}
        for k in self.floats:  # float32 copies (exact): the inputs are never modified
            self._sum(k, self.sums[k], [(first.array(k), self.infos[k].dtype)])
        self.fixed = {k: first.get(k).clone() for k, i in self.infos.items() if not i.is_float}
        self.next_sums: dict[str, np.ndarray] = {}
        self.means: dict[str, np.ndarray] = {}
        self.computed: tuple[Checkpoint, set[str]] | None = None  # next_sums: θ, tensors

    def candidate(self, label: str, extra: Checkpoint) -> LazyCheckpoint:
        n, members = self.size + 1, [*self.members, extra]
        self.computed = (extra, set())

        def step(k: str, **into: Any) -> None:  # next_sums[k], and the mean `into`
            if self.computed is None or self.computed[0] is not extra:
                raise RuntimeError(f"{label}: read after the next candidate was computed")
            nxt = self.next_sums.setdefault(k, np.empty_like(self.sums[k]))
            self._sum(k, nxt, [(extra.array(k), extra.infos[k].dtype)], start=self.sums[k],
                      n=n, members=members, **into)  # fmt: skip
            self.computed[1].add(k)

        def compute(k: str) -> torch.Tensor:
            if not self.infos[k].is_float:
                return self.fixed[k]
            mean = self.means.setdefault(k, np.empty_like(self.sums[k]))
            step(k, mean=mean)
            return torch.from_numpy(mean)

        def compute_parts(k: str, sink: Sink) -> None:  # rounded slice by slice: no `means`
            if not self.infos[k].is_float:
                sink(0, to_numpy(self.fixed[k]).reshape(-1))
            else:
                step(k, sink=sink)

        return LazyCheckpoint(label, self.infos, compute, model_files_from=self.folder,
                              compute_parts=compute_parts)  # fmt: skip

    def add(self, ckpt: Checkpoint) -> None:
        """Add `ckpt` (free if the last candidate was computed whole with it)."""
        super().add(ckpt)
        if (
            self.computed is not None
            and self.computed[0] is ckpt
            and self.computed[1] >= set(self.floats)
        ):
            self.sums, self.next_sums = self.next_sums, self.sums
        else:  # a step replayed from the history: no candidate was computed
            for k in self.floats:
                term = (ckpt.array(k), ckpt.infos[k].dtype)
                self._sum(k, self.sums[k], [term], start=self.sums[k])
        self.computed = None

    def soup(self, label: str) -> LazyCheckpoint:
        sums, fixed, n, members = self.sums, self.fixed, self.size, list(self.members)

        def compute(k: str) -> torch.Tensor:
            if k in fixed:
                return fixed[k]
            mean = sums[k] / n
            if self.check and not _finite(mean.reshape(-1), self.infos[k].dtype):
                check_finite(k, self.infos[k].dtype, members)
            return torch.from_numpy(mean)

        return LazyCheckpoint(label, self.infos, compute, model_files_from=self.folder)


class StreamedSum(SoupStore):
    """No sum kept: each candidate tensor is the mean of the members and θ, read from their
    (memory-mapped) inputs into a fresh array that the reader frees: float32 from `get`,
    the declared dtype from `array` (what a command evaluator's file gets, rounded slice by
    slice). Memory: a few copies of the largest tensor, whatever the model size; a step
    reads the soup's members again (page-cached) plus θ."""

    kind = "streamed"

    def candidate(self, label: str, extra: Checkpoint) -> LazyCheckpoint:
        return self._mean_of(label, [*self.members, extra])

    def soup(self, label: str) -> LazyCheckpoint:
        """The soup, read from its members, which stay open until the soup is closed."""
        return self._mean_of(label, list(self.members))

    def _mean_of(self, label: str, members: list[Checkpoint]) -> LazyCheckpoint:
        def terms(k: str) -> list[Term]:
            return [(m.array(k), m.infos[k].dtype) for m in members]

        def compute(k: str) -> torch.Tensor:  # float32, as `InMemorySum` gives it
            info = self.infos[k]
            if not info.is_float:
                return members[0].get(k).clone()
            out = np.empty(info.shape, np.float32)
            self._sum(k, out, terms(k), mean=out, n=len(members), members=members)
            return torch.from_numpy(out)

        def compute_parts(k: str, sink: Sink) -> None:  # the declared dtype, slice by slice
            if not self.infos[k].is_float:
                sink(0, members[0].array(k).reshape(-1))
            else:
                self._sum(k, None, terms(k), sink=sink, n=len(members), members=members)

        def compute_array(k: str) -> np.ndarray:  # the declared dtype, no float32 copy
            info = self.infos[k]
            if not info.is_float:
                return members[0].array(k).copy()
            out = np.empty(info.numel, info.dtype.numpy)

            def put(first: int, part: np.ndarray) -> None:
                out[first : first + part.size] = part

            compute_parts(k, put)
            return out.reshape(info.shape)

        return LazyCheckpoint(label, self.infos, compute, model_files_from=self.folder,
                              compute_array=compute_array, compute_parts=compute_parts)  # fmt: skip


def _in_slices(pool: ThreadPoolExecutor | None, threads: int, size: int,
               part: Callable[[int, int], None]) -> None:  # fmt: skip
    """Run `part(lo, hi)` over whole `CHUNK` slices of `range(size)`, one span per thread
    (this one included); an array under two slices stays on this thread."""
    if pool is None or size < 2 * CHUNK:
        part(0, size)
        return
    step = -(-size // threads // CHUNK) * CHUNK
    bounds = [(lo, min(lo + step, size)) for lo in range(0, size, step)]
    others = [pool.submit(part, lo, hi) for lo, hi in bounds[1:]]
    try:
        part(*bounds[0])
    finally:
        for f in others:
            f.result()


def _finite(x: np.ndarray, dtype: DType) -> bool:
    """True if float32 slice `x` holds no NaN or Inf, and rounds to finite float16 values
    if `dtype` is float16 (|x| < 65520: 65504 is float16's largest)."""
    with np.errstate(all="ignore"):
        if not np.isfinite(np.add.reduce(x)) and not np.isfinite(x).all():
            return False
    return dtype.name != "F16" or not x.size or float(np.abs(x).max()) < 65520.0
