"""What the tests that stop, kill or starve a running soup share: inputs large enough for
a signal to land mid-write, a `soup` child paused mid-write, the soup in a child without
its supervisor or under a file-size limit, and a process liveness check.

The child processes pause at a chosen tensor through a hook on the writer, so a kill or a
truncation lands mid-write every time instead of racing the clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

TENSORS = 8
NUMEL = 1 << 20  # 8 tensors x 4 MiB: a 32 MiB output, written tensor by tensor

# `soup` in a child process, without the supervisor: `main` in the child itself.
UNSUPERVISED = "import sys; from modelsoups.cli import main; sys.exit(main(sys.argv[1:]))"

_ENTRIES = {
    "main": "from modelsoups.cli import main\nsys.exit(main(argv))",  # unsupervised
    "run": "from modelsoups.cli import run\nsys.argv = ['soup', *argv]\nrun()",  # supervised
}


def paused_soup(entry: str = "main") -> str:
    """Source of a `soup` child: `python -c SRC PAUSE_AFTER JSON_ARGV` hooks the writer and,
    after PAUSE_AFTER tensors, prints "paused" and sleeps, waiting for the test to kill it.
    entry "main" runs the work in the child itself, "run" as the console script does (a
    supervisor and a child doing the work)."""
    hook = textwrap.dedent(
        """
        import json, sys, time
        from modelsoups.io import writer

        pause_after, argv = int(sys.argv[1]), json.loads(sys.argv[2])
        original, written = writer.ShardedWriter.write, []

        def write(self, name, tensor):
            original(self, name, tensor)
            written.append(name)
            if len(written) == pause_after:
                print("paused", flush=True)
                time.sleep(120)

        writer.ShardedWriter.write = write
        """
    )
    return hook + _ENTRIES[entry] + "\n"


def start_paused(
    argv: list[str],
    pause_after: int = TENSORS // 2,
    child: str | None = None,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Start the soup in a child (default: `paused_soup()`) and return once it is paused
    mid-write; new_session puts it in a process group of its own (for a Ctrl-C to it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", child or paused_soup(), str(pause_after), json.dumps(argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "paused":
        proc.kill()
        raise AssertionError(f"child did not pause: {line!r} {proc.communicate()[1]}")
    return proc


def file_size_limited(limit: int) -> str:
    """Source of an unsupervised `soup` child (`python -c SRC ARGS...`) whose writes past
    `limit` bytes fail with EFBIG: RLIMIT_FSIZE, a full disk without privileges."""
    return textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from modelsoups.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )


def big_inputs(tmp: Path, n: int = 2) -> list[Path]:
    """n fine-tunes of one base (so the soup is meaningful), 32 MiB each."""
    base = torch.randn(TENSORS, NUMEL, generator=torch.Generator().manual_seed(0))
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1 + i)
        sd = {
            f"layer{j}.weight": base[j] + 0.01 * torch.randn(NUMEL, generator=g)
            for j in range(TENSORS)
        }
        path = tmp / f"run{i}.safetensors"
        save_file(sd, path)
        paths.append(path)
    return paths


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
