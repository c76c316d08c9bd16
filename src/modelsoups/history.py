"""The evaluation history: an append-only JSON-lines log that makes a search resumable.

Greedy selection and the held-out sweeps append one record per evaluation (ingredient
scores, greedy steps, sweep points, the final score) and fsync each line, so a crash loses
at most the evaluation that was running; `resume=True` replays what was logged. Greedy's
records name their `scorer` (`check_scorer`): a resume that scores otherwise is refused.

One run at a time: the file is held under an exclusive `flock` while it is open, so a
second run on the same history is refused with one line instead of interleaving its
records. A record read back is checked (its kind, name and score) before anything trusts
it, and a write that fails (disk full, file-size limit) is undone to the last whole line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .errors import OutputError, SoupError

__all__ = ["RESERVED", "History", "check_dataset", "check_scorer", "record"]

# Fields every record kind may carry; a metric or a --dataset of that name would overwrite one.
RESERVED = frozenset(
    {"kind", "model_name", "accepted", "soup_size", "given", "alpha", "scale", "scorer"}
)
_SCORED = ("ingredient", "greedy", "sweep", "final")
MAX_BYTES = 256 << 20  # the largest history read back


def check_dataset(dataset: str) -> str:
    """The name of the held-out metric, refused if a history field already has that name."""
    if not dataset or dataset in RESERVED or dataset.startswith("eval."):
        raise SoupError(
            f"dataset name {dataset[:40]!r} is empty or a history field "
            f"({', '.join(sorted(RESERVED))}); choose another --dataset"
        )
    return dataset


def check_scorer(log: History, scorer: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `scorer` field of this run's records (what scores: a metric's spec, an eval
    command). A resumed history whose records were scored by another is refused, naming
    both, before anything is written; records without one (older versions) resume."""
    if scorer is None:
        return {}
    new = json.loads(json.dumps(dict(scorer)))  # as it reads back from the file
    for r in log.records:
        old = r.get("scorer")
        if isinstance(old, dict) and old != new:  # not a dict: an older evaluator's metric
            named = [k for k in ("metric", "eval") if k in old or k in new]  # always shown
            keys = named + sorted(k for k in {*old, *new} - {*named} if old.get(k) != new.get(k))
            raise SoupError(
                f"{log.path}: {r['model_name']!r} was scored by {_fields(old, keys)}, this run "
                f"scores by {_fields(new, keys)}; resume with the same scorer, or start "
                "another history"
            )
    return {"scorer": new}


def _fields(spec: Mapping[str, Any], keys: list[str]) -> str:
    """`k=value, ...`, each value cut in its middle to fit one error line with the other."""
    shown = [f"{k}={spec.get(k)!r}" for k in keys]
    return ", ".join(s if len(s) <= 150 else f"{s[:70]}...{s[-70:]}" for s in shown)


def record(
    kind: str,
    model_name: str,
    dataset: str,
    score: float,
    metrics: Mapping[str, float] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One history record. An evaluator's metric named like a field of the record
    (`model_name`, the dataset, `accepted`...) is kept as `eval.NAME`, never over it."""
    fixed = {"kind", "model_name", dataset, *RESERVED, *fields}
    out: dict[str, Any] = {"kind": kind, "model_name": model_name, dataset: score}
    out.update({(f"eval.{k}" if k in fixed else k): v for k, v in (metrics or {}).items()})
    out.update(fields)
    return out


class History:
    """An append-only JSON-lines log, one record per evaluation, fsynced line by line.

    Re-opened with `resume=True`, it returns the records of an interrupted run (a torn last
    line from a crash is dropped) so that nothing already scored is evaluated again. Every
    record read back must have a `kind`, a `model_name` and, for scored kinds, a finite
    `dataset` score; anything else is refused with the line number. Close it (or use it as
    a context manager) to release the lock; a history this run created and never wrote to
    is removed then.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        resume: bool = False,
        dataset: str = "held_out",
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.dataset = dataset
        self.records: list[dict[str, Any]] = []
        self._file: IO[bytes] | None = None
        self._created = False
        if self.path is not None:
            self._open(self.path, resume)

    def _open(self, path: Path, resume: bool) -> None:
        if not resume and path.exists():
            raise SoupError(f"{path}: history exists; pass --resume to continue it, or remove it")
        if path.exists() and not path.is_file():
            raise OutputError(f"{path}: history is not a regular file")
        flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_EXCL)
        existed = path.exists()
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            raise SoupError(f"{path}: history exists; pass --resume to continue it") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot write the history ({e.strerror})") from None
        # unbuffered: a failed write must not linger in a buffer and fail again at close
        self._file, self._created = os.fdopen(fd, "r+b", buffering=0), not existed
        try:
            _lock(self._file, path)
            self._load(path)
        except BaseException:
            self.close()
            raise

    def _load(self, path: Path) -> None:
        assert self._file is not None
        size = os.fstat(self._file.fileno()).st_size
        if size > MAX_BYTES:  # ~10⁶ evaluations; more is another file (or a sparse one)
            raise SoupError(f"{path}: {size:,} bytes is not a history (at most {MAX_BYTES:,}); "
                            "give another --history")  # fmt: skip
        raw = self._file.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SoupError(f"{path}: not a history (binary content); remove it or "
                            "give another --history") from None  # fmt: skip
        lines = text.splitlines()
        good: list[str] = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # a blank line (an edit by hand) carries nothing
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, 4300+ digits, nested too deep
                # a crash tears the last line before its newline: that line is redone
                torn = not raw.endswith(b"\n") and not any(ln.strip() for ln in lines[n:])
                if not torn:
                    raise SoupError(f"{path}: line {n} is not JSON; the history is damaged "
                                    "(fix or remove that line)") from None  # fmt: skip
                break
            self.records.append(self._check(rec, path, n))
            good.append(line)
        kept = "".join(f"{ln}\n" for ln in good).encode()
        if kept != raw:
            self._file.seek(0)
            self._file.truncate()
            self._write(kept)

    def _check(self, rec: object, path: Path, n: int) -> dict[str, Any]:
        """`rec` if it is a record this code can trust, else a one-line error."""
        where = f"{path}: line {n}"
        if not isinstance(rec, dict):
            raise SoupError(f"{where} is not a JSON object; fix or remove that line")
        kind, name = rec.get("kind"), rec.get("model_name")
        if not isinstance(kind, str) or not isinstance(name, str):
            raise SoupError(f"{where}: a record needs a 'kind' and a 'model_name' (text); "
                            "fix or remove that line")  # fmt: skip
        if kind in _SCORED:
            score = rec.get(self.dataset)
            if not _finite(score):
                shown = repr(score)[:40] if self.dataset in rec else "missing"
                raise SoupError(
                    f"{where}: {self.dataset!r} is {shown}, not a finite number "
                    "(--dataset changed? a damaged line?); fix or remove that line"
                )
        if kind == "greedy" and not (
            isinstance(rec.get("accepted"), bool) and _integer(rec.get("soup_size"))
        ):
            raise SoupError(f"{where}: a greedy step needs 'accepted' (true/false) and "
                            "'soup_size' (an integer); fix or remove that line")  # fmt: skip
        return rec

    def append(self, rec: dict[str, Any]) -> None:
        """Log `rec` (one fsynced line); a failed write leaves the file as it was."""
        self.records.append(rec)
        if self._file is None:
            return
        line = (json.dumps(rec) + "\n").encode()
        self._file.seek(0, os.SEEK_END)
        self._write(line)

    def _write(self, data: bytes) -> None:
        assert self._file is not None and self.path is not None
        start = self._file.tell()
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) or 0 :]
            os.fsync(self._file.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):  # no torn line: back to the last whole one
                self._file.truncate(start)
                self._file.seek(start)
            why = "disk full" if e.errno == errno.ENOSPC else f"write failed ({e.strerror or e})"
            raise OutputError(f"{self.path}: {why} while appending to the history; the "
                              "lines written before are kept for --resume") from None  # fmt: skip

    def close(self) -> None:
        """Release the lock; remove the file if this run created it and wrote nothing."""
        f, self._file = self._file, None
        if f is None or self.path is None:
            return
        with contextlib.suppress(OSError):
            if self._created and os.fstat(f.fileno()).st_size == 0:
                self.path.unlink()
        with contextlib.suppress(OSError):
            f.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(f: IO[bytes], path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the O_EXCL create still guards
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SoupError(f"{path}: another soup run is using this history; wait for it to "
                        "finish or choose another output") from None  # fmt: skip
    except OSError:
        pass  # a filesystem without locks (some network mounts): run unlocked


def _finite(x: object) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond any float
        return False


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
