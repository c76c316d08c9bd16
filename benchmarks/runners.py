"""How each method is invoked, plus the side measurements (start-up, baseline, profile).

The harness only ever talks to ``Context``; each method becomes one command line that
``measure.run`` starts in a fresh process.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import measure

HERE = Path(__file__).resolve().parent
METHODS_PY = str(HERE / "methods.py")
MERGEKIT_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Names the greedy-soup API (issue 3) might be published under; the first that imports wins.
GREEDY_CANDIDATES = ["modelsoups.greedy_soup", "modelsoups.greedy", "modelsoups.recipes.greedy"]


class Context:
    def __init__(
        self, soup: str | None, mergekit_venv: Path, out_dir: Path, snapshot: Path | None = None
    ) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        # The console script beside this interpreter, not a pyenv shim on PATH: a shim
        # costs ~0.2 s per start and would be charged to `soup --help`.
        sibling = Path(sys.executable).parent / "soup"
        self.soup = soup or (str(sibling) if sibling.exists() else shutil.which("soup"))
        self.soup_cmd = [self.soup] if self.soup else []
        self.env: dict[str, str] | None = None
        if snapshot is not None:
            # A frozen copy of the package: the editable install follows a work tree that
            # others edit during the run, which would mix code versions between rows.
            self.env = {**os.environ, "PYTHONPATH": str(snapshot)}
            self.soup_cmd = [sys.executable, "-m", "modelsoups"]
            self.soup = " ".join(self.soup_cmd)
        self.soup_note = self._probe_soup()
        mk = mergekit_venv / "bin" / "mergekit-yaml"
        self.mergekit = str(mk) if mk.exists() else None

    def _probe_soup(self) -> str:
        if not self.soup:
            return "skipped: no `soup` on PATH (pip install -e /work/main)"
        r = subprocess.run(
            [*self.soup_cmd, "uniform", "--help"], capture_output=True, text=True, env=self.env
        )
        if r.returncode != 0:
            return "skipped: `soup uniform --help` fails (CLI not landed yet?)"
        return ""

    # -- the methods ---------------------------------------------------------------------
    def command(
        self, method: str, dirs: list[Path], files: list[Path], dtype: str
    ) -> tuple[list[str], Path, str]:
        """Return (command, output path, skip note) for one method over these inputs."""
        out = self.out_dir / f"{method}.safetensors"
        self.cleanup(out)
        names = [str(f) for f in files]
        if method == "cat":
            return ["cat", *names], out, ""
        if method in ("memmap", "naive"):
            return [sys.executable, METHODS_PY, method, str(out), *names], out, ""
        if method == "mergekit":
            if not self.mergekit:
                return [], out, "skipped: mergekit not installed (see benchmarks/README.md)"
            out = self.out_dir / "mergekit"
            self.cleanup(out)
            cfg = self.out_dir / "mergekit.yml"
            models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in dirs)
            cfg.write_text(
                f"merge_method: linear\ndtype: {MERGEKIT_DTYPE[dtype]}\nmodels:\n{models}"
            )
            flags = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            return [self.mergekit, str(cfg), str(out), *flags], out, ""
        if method == "soup":
            if self.soup_note:
                return [], out, self.soup_note
            cmd = [*self.soup_cmd, "--quiet", "uniform", *map(str, dirs), "-o", str(out)]
            return cmd, out, ""
        raise ValueError(f"unknown method {method!r}")

    def env_for(self, method: str) -> dict[str, str] | None:
        """The environment a method runs in (the snapshot's PYTHONPATH for our code)."""
        return self.env if method == "soup" else None

    def cleanup(self, out: Path) -> None:
        """Delete an output (frees its page cache too) so that the next run starts clean."""
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()

    def check(self, out: Path, files: list[Path]) -> dict[str, object]:
        """Compare an output with the float64 mean of the inputs (not timed)."""
        target = out / "model.safetensors" if out.is_dir() else out
        if not target.exists():
            return {"error": f"no output at {target}"}
        r = subprocess.run(
            [sys.executable, METHODS_PY, "check", str(target), *map(str, files)],
            capture_output=True,
            text=True,
        )
        try:
            parsed: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
            return parsed
        except (IndexError, json.JSONDecodeError):
            return {"error": r.stderr[-400:]}

    # -- side measurements ---------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        code = (
            "import torch, safetensors, numpy as np; print(torch.__version__, "
            "safetensors.__version__, np.__version__)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out["torch"], out["safetensors"], out["numpy"] = (r.stdout.split() + ["?"] * 3)[:3]
        if self.mergekit:
            py = str(Path(self.mergekit).parent / "python")
            code = (
                "import importlib.metadata as m, torch; print(m.version('mergekit'), "
                "torch.__version__)"
            )
            r = subprocess.run([py, "-c", code], capture_output=True, text=True)
            out["mergekit"] = r.stdout.strip() or "broken"
        code = "import modelsoups as m; print(m.__version__, m.__file__)"
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=self.env
        )
        out["modelsoups"] = r.stdout.strip() or "not installed"
        out["soup_executable"] = self.soup or "none"
        return out

    def baseline(self, reps: int) -> dict[str, object]:
        """Peak RssAnon of an interpreter that imports torch + safetensors and nothing else."""
        peaks = [
            measure.run([sys.executable, METHODS_PY, "baseline"]).peak_anon_bytes
            for _ in range(max(3, reps))
        ]
        return {"peak_anon_bytes": statistics.median(peaks), "all": peaks}

    def startup(self, tiny_dirs: list[Path], reps: int) -> dict[str, object]:
        """Wall time of `python -c pass`, `import torch`, `soup --help`, a tiny N=2 soup."""

        def med(cmd: list[str], k: int) -> float:
            return statistics.median(measure.run(cmd, env=self.env).wall_s for _ in range(k))

        res: dict[str, object] = {
            "python_pass_s": med([sys.executable, "-c", "pass"], 5),
            "import_torch_s": med([sys.executable, "-c", "import torch"], 3),
        }
        if not self.soup:
            res["note"] = self.soup_note
            return res
        res["soup_help_s"] = med([*self.soup_cmd, "--help"], 5)
        if self.soup_note:
            res["note"] = self.soup_note
            return res
        cmd, out, _ = self.command("soup", tiny_dirs, [], "fp32")
        times = []
        for _ in range(max(3, reps)):
            r = measure.run(cmd, env=self.env)
            self.cleanup(out)
            if r.returncode != 0:
                res["note"] = f"tiny soup failed: {r.stderr_tail[-300:]}"
                return res
            times.append(r.wall_s)
        res["soup_tiny_n2_s"] = statistics.median(times)
        return res

    def greedy_hook(self) -> dict[str, object]:
        """Find the greedy-soup API of issue 3. Timing a greedy step vs re-averaging is wired
        here once that API exists; until then the result says what is missing."""
        code = (
            "import importlib, json\nfound = None\n"
            f"for name in {GREEDY_CANDIDATES!r}:\n"
            "    mod, _, attr = name.rpartition('.')\n"
            "    try:\n"
            "        m = importlib.import_module(mod)\n"
            "        if hasattr(m, attr): found = name; break\n"
            "        importlib.import_module(name); found = name; break\n"
            "    except Exception: pass\n"
            "print(json.dumps(found))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=self.env
        )
        found = json.loads(r.stdout.strip() or "null")
        if not found:
            return {"status": "missing", "looked_for": GREEDY_CANDIDATES}
        return {"status": "found, not timed in this run (see --greedy-config)", "api": found}

    def greedy(self, dirs: list[Path]) -> dict[str, object]:
        """Time one greedy step against a re-average (`methods.py greedy`, own process)."""
        hook = self.greedy_hook()
        if hook["status"] == "missing":
            return hook
        out = self.out_dir / "greedy.safetensors"
        self.cleanup(out)
        cmd = [sys.executable, METHODS_PY, "greedy", str(out), *map(str, dirs)]
        r = measure.run(cmd, stdout_devnull=False, env=self.env)
        self.cleanup(out)
        try:
            timed: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {**hook, "status": f"failed: {r.stderr_tail[-400:]}"}
        return {**hook, **timed, "peak_anon_bytes": r.peak_anon_bytes}

    def profile(self, dirs: list[Path], out_dir: Path, tag: str) -> dict[str, object]:
        """py-spy `soup uniform` once; keep the collapsed stacks and a hot-spot summary."""
        spy = shutil.which("py-spy")
        if not spy or self.soup_note:
            return {"note": "py-spy or soup missing" if not spy else self.soup_note}
        raw = out_dir / f"profile-{tag}.txt"
        cmd, out, _ = self.command("soup", dirs, [], "fp32")
        r = subprocess.run(
            [
                spy,
                "record",
                "-r",
                "100",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--subprocesses",
                "--nonblocking",
                "--",
                *cmd,
            ],
            capture_output=True,
            text=True,
            env=self.env,
        )
        self.cleanup(out)
        if r.returncode != 0 or not raw.exists():
            return {"note": f"py-spy failed: {r.stderr[-400:]}"}
        summary = summarize_collapsed(raw)
        # Collapsed stacks (speedscope and flamegraph.pl read them); gzip: ~2 MB → ~0.1 MB.
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        return {"raw": f"{raw.name}.gz", **summary}


def summarize_collapsed(path: Path, top: int = 12) -> dict[str, object]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()  # self time per source line
    total = 0
    for text in path.read_text().splitlines():
        stack, _, count = text.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # "func (path/file.py:123)" -> "func (file.py)": aggregate per function, not line;
        # drop py-spy's "process N:..." root frames added by --subprocesses.
        raw_frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not raw_frames:
            continue
        frames = [re.sub(r"\((?:[^()]*/)?([^/():]+):\d+\)$", r"(\1)", f) for f in raw_frames]
        self_c[frames[-1]] += n
        lines[re.sub(r"\((?:[^()]*/)?([^/()]+)\)$", r"(\1)", raw_frames[-1])] += n
        for f in set(frames):
            incl[f] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(v / total, 3)) for f, v in c.most_common(top)]

    return {
        "samples": total,
        "self": share(self_c),
        "self_lines": share(lines),
        "inclusive": share(incl),
    }
