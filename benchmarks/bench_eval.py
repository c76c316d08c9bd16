"""Time per greedy evaluation: in-process `--metric lm-loss` vs an eval command (`--eval`).

Builds N fine-tunes of a ~100M-parameter Llama (random init plus noise, saved as HF
folders) and held-out token ids, then runs `soup greedy` twice on the same job, in one run:
with the built-in metric (model built once, candidates copied in) and with a command that
loads each candidate file in a new Python process and computes the same loss. Prints a
table of seconds per evaluation and the ratio; both runs must select the same soup.

    python benchmarks/bench_eval.py [--n 3] [--layers 10] [--workdir /tmp/bench-eval]
        [--out benchmarks/results/eval-95M-N3.md]

With `--out`, the table is also written there with the commit, the date and the machine's
load average at start and end (numbers taken under load are slower than the machine can do;
the ratio is what compares, both runs sharing the load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REF_EVAL = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
total, count = 0.0, 0
with torch.no_grad():
    for line in open(sys.argv[2]):
        ids = torch.tensor([json.loads(line)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
print(-total / count)
"""


def make_job(root: Path, n: int, layers: int) -> tuple[list[Path], Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                         tie_word_embeddings=True)  # fmt: skip
    paths = []
    for i in range(n):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.002 * (i + 1) * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ft{i}")
        paths.append(root / f"ft{i}")
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"input_ids": torch.randint(0, 32000, (64,), generator=g)
                                        .tolist()}) + "\n" for _ in range(8)))  # fmt: skip
    (root / "ref_eval.py").write_text(REF_EVAL)
    return paths, data, params


def run_greedy(root: Path, name: str, paths: list[Path], args: list[str]) -> tuple[float, dict]:
    out = root / name
    started = time.perf_counter()
    subprocess.run(["soup", "-q", "greedy", *map(str, paths), "-o", str(out), *args], check=True)
    seconds = time.perf_counter() - started
    return seconds, json.loads((root / f"{name}.report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-eval"))
    ap.add_argument("--out", type=Path, default=None, help="also write the results here (.md)")
    a = ap.parse_args()
    load_start = os.getloadavg()
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    paths, data, params = make_job(a.workdir, a.n, a.layers)
    evals = a.n + (a.n - 1)  # N ingredient scores, then N-1 greedy steps
    command = f"{sys.executable} {a.workdir / 'ref_eval.py'} {{ckpt}} {data}"
    metric = ["--metric", "lm-loss", "--data", str(data), "--device", "cpu"]
    t_in, r_in = run_greedy(a.workdir, "in_process", paths, metric)
    t_cmd, r_cmd = run_greedy(a.workdir, "command", paths, ["--eval", command])
    assert r_in["selected"] == r_cmd["selected"], (r_in["selected"], r_cmd["selected"])
    lines = [f"greedy soup of {a.n} x {params / 1e6:.1f}M-parameter Llama, {evals} evaluations "
             f"each, 8 x 64 held-out tokens; selected {r_in['selected']}",
             f"{'evaluator':<28}{'total s':>10}{'s / evaluation':>16}{'ratio':>8}"]  # fmt: skip
    for label, t in (("in process (--metric)", t_in), ("command (--eval)", t_cmd)):
        lines.append(f"{label:<28}{t:>10.1f}{t / evals:>16.2f}{t / t_in:>8.2f}")
    print("\n".join(lines))
    if a.out is not None:
        a.out.write_text(_results(lines, load_start, os.getloadavg()))
    shutil.rmtree(a.workdir, ignore_errors=True)


def _results(lines: list[str], load_start: tuple[float, ...], load_end: tuple[float, ...]) -> str:
    """The table as markdown, with what it was measured on and under which load."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load = "/".join(f"{x:.2f}" for x in load_start), "/".join(f"{x:.2f}" for x in load_end)
    return (f"# In-process metric vs eval command, per greedy evaluation — {when}\n\n"
            f"git {commit}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs. Load average "
            f"(1/5/15 min) at start {load[0]}, at end {load[1]}: other work shared the machine, "
            "and both runs shared it alike.\n\n"
            "```\n" + "\n".join(lines) + "\n```\n")  # fmt: skip


if __name__ == "__main__":
    main()
