"""What a soup command writes, checked before it starts and written when it ends.

Every soup command (`soup uniform`, `weighted`, `greedy`, `wise-ft`, `task-arithmetic`,
`stock`, `learned`) writes the soup with the streaming atomic writer, a JSON report next to
it (`SOUP.report.json`: recipe, ingredients, weights, scores, times) and, when something is
scored, the evaluation history (`SOUP.history.jsonl`, resumable with `--resume`). All of
these paths are checked before any evaluation (`check_outputs`), and nothing is written to
the output name until selection has finished.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NonFiniteError, OutputError
from .common import progress_bar, report_result
from .options import (
    AdapterOutput,
    AverageOptions,
    EvalOptions,
    ReadOptions,
    RecordOptions,
    TestOptions,
    WriteOptions,
)

if TYPE_CHECKING:
    from ..types import SoupResult


def sidecar(out: Path, suffix: str, given: Path | None) -> Path:
    """`given`, else `out` with its `.safetensors` suffix replaced by `suffix`."""
    if out.name in ("", ".", ".."):  # `-o ''`, `-o .`, `-o /`: no name to put beside
        raise OutputError(f"-o {str(out)!r}: name the soup to write, e.g. -o soup.safetensors")
    return (
        given
        if given is not None
        else out.with_name(out.name.removesuffix(".safetensors") + suffix)
    )


def check_outputs(
    out: Path,
    inputs: list[Path],
    write: WriteOptions,
    records: RecordOptions = RecordOptions(),
    reads: Sequence[Path | None] = (),
    adapters: AdapterOutput = AdapterOutput(),
    *,
    workdir: Path | None = None,
    sidecars: Sequence[Path] = (),
) -> None:
    """Fail before any evaluation if the output could not be written at the end, or if any
    path the run writes (report, history, candidate folder in `workdir`, `sidecars`) is an
    input, a file the run `reads` besides them (`--scores`, `--data`, `--model`, the
    `--merge-into` base), or another output."""
    from ..adapters import check_adapter_output
    from ..candidate import CANDIDATES
    from ..io.writer import check_destination, check_output, check_sharding, temporary_name
    from .options import parse_size

    written = [sidecar(out, ".report.json", records.report),
               sidecar(out, ".history.jsonl", records.history),
               temporary_name(work_name(out, workdir), CANDIDATES), *sidecars]  # fmt: skip
    given = [Path(p) for p in (*reads, adapters.merge_into) if p is not None]
    check_output(out, [*inputs, *given], sidecars=written)
    check_sharding(out, parse_size(write.max_shard_size))
    check_destination(out, overwrite=write.overwrite)
    check_adapter_output(inputs, out, adapters.merge_into, adapters.allow_different_base)
    try:  # the candidate folder, history and report go there too: fail now, not at the end
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name[:64]}.soup-check-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"{out}: cannot write in {out.parent} ({e.strerror})") from None
    if workdir is not None:  # the candidate folder goes there instead
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name[:64]}.soup-check-", dir=workdir))
        except OSError as e:
            raise OutputError(f"{workdir}: --workdir: cannot write in it ({e.strerror})") from None


def scoring_reads(scoring: EvalOptions, test: TestOptions = TestOptions()) -> list[Path | None]:
    """What scoring reads besides the ingredients: held-out and test data, the --model folder."""
    return [scoring.data, scoring.run.model, test.test_data]


# Where the kernel shows devices and its own state: no place for candidate files, except
# other filesystems mounted below them (/dev/shm, a tmpfs, is a fine --workdir).
DEVICE_FOLDERS = (Path("/dev"), Path("/proc"), Path("/sys"))


def work_name(output: Path, workdir: Path | None) -> Path:
    """Candidate files go in a folder named after `output`, beside it or in `workdir`."""
    if workdir is None:
        return output
    check_workdir(workdir)
    return workdir / output.name


def check_workdir(workdir: Path) -> None:
    """Refuse, in one line, a --workdir that is not a folder for candidate files: missing,
    a special file (FIFO, device, ...), or a folder on the filesystem of one of
    `DEVICE_FOLDERS` (`/dev` itself). Whether this user can write in it is checked with
    the other outputs (`check_outputs`), once it is known not to be an input."""
    from ..io.files import file_kind

    try:
        st = os.stat(workdir)
    except (OSError, ValueError):
        raise OutputError(f"{workdir}: --workdir is not an existing folder") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{workdir}: --workdir is {file_kind(st.st_mode)}, not a folder")
    real = workdir.resolve()
    for system in DEVICE_FOLDERS:
        with contextlib.suppress(OSError):
            if real.is_relative_to(system.resolve()) and os.stat(system).st_dev == st.st_dev:
                raise OutputError(
                    f"{workdir}: --workdir is in {system}, where the system keeps devices and its "
                    "own state, not files; give a folder on a disk (or a tmpfs such as /dev/shm)"
                )


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write `report` (plus the version) as JSON to `path`, atomically."""
    from ..io.writer import write_json
    from ..version import __version__

    write_json(path, {**report, "modelsoups_version": __version__})


@contextlib.contextmanager
def naming_output(out: Path) -> Iterator[None]:
    """A soup that overflows its dtype (`average.check_finite`, whose message names the
    tensor: no input is to blame) raised with the output it was made for named first."""
    try:
        yield
    except NonFiniteError as e:
        if not str(e).startswith("tensor "):  # names an input, or already the output
            raise
        raise NonFiniteError(f"{out}: {e}") from None


def write_mean(
    paths: list[Path],
    out: Path,
    weights: list[float] | None,
    *,
    recipe: str,
    read: ReadOptions,
    write: WriteOptions,
    average: AverageOptions = AverageOptions(),
    normalize: bool = True,
    allow_negative: bool = False,
    shown: Sequence[str] = (),
    adapters: AdapterOutput = AdapterOutput(),
) -> SoupResult:
    """Stream the (weighted) mean of `paths` into `out` with a progress bar; print the result.

    Warnings in `shown` (printed already, e.g. by the selection) are dropped, not repeated.
    """
    from ..recipes.uniform import soup_files  # models, or LoRA adapters (exact)

    dtype, max_shard_size = write.output_dtype(), write.shard_bytes()
    with progress_bar(f"{recipe} soup") as bar, naming_output(out):
        result = soup_files(
            paths, out, weights=weights, normalize=normalize, allow_negative=allow_negative,
            accumulate=average.accumulate, dtype=dtype, non_float=average.non_float,
            allow_nonfinite=average.allow_nonfinite, max_shard_size=max_shard_size,
            key=read.key, unsafe_pickle=read.unsafe_pickle, overwrite=write.overwrite,
            recipe=recipe, progress=bar, merge_into=adapters.merge_into,
            **({"allow_different_base": True} if adapters.allow_different_base else {}),
        )  # fmt: skip
    result.warnings = [w for w in result.warnings if w not in shown]
    report_result(result)
    return result
