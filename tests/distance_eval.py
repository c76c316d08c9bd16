"""An eval command in plain Python, shared by the tests that run greedy through real commands."""

from __future__ import annotations

from pathlib import Path

from conftest import save_as, tiny_state_dict

# An eval command in plain Python (fast to start): the score is minus the distance of
# fc.weight (float32) to that of a reference checkpoint (run0: the best ingredient).
EVAL = """
import json, struct, sys
def fc(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        a, b = json.loads(f.read(n))["fc.weight"]["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    return struct.unpack(f"<{len(raw) // 4}f", raw)
d = sum((p - q) ** 2 for p, q in zip(fc(sys.argv[1]), fc(sys.argv[2])))
print("some log line")
print(json.dumps({"score": -d, "distance": d}))
"""


def distance_ingredients(tmp_path: Path, n: int = 3) -> list[str]:
    """Write n noisy tiny ingredients run0..run{n-1} and the EVAL script `ev.py` to tmp_path."""
    paths = [str(save_as(tiny_state_dict(i, noise=0.01 * (i + 1)), tmp_path / f"run{i}",
                         "safetensors")) for i in range(n)]  # fmt: skip
    (tmp_path / "ev.py").write_text(EVAL)
    return paths
