"""Turn the harness's JSON into markdown tables, a target check and a plot.

python benchmarks/report.py benchmarks/results/bench.json   # re-render md + png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 2**20
METHOD_ORDER = ["cat", "memmap", "naive", "mergekit", "soup"]
TARGET = ("110M", "fp32", 16)
SIZE_ORDER = ["tiny", "25M", "110M", "440M"]


def _index(res: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, dict[str, Any]]]:
    table: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in res["runs"]:
        table[(row["size"], row["dtype"], row["n"])][row["method"]] = row
    order = {s: i for i, s in enumerate(SIZE_ORDER)}
    keys = sorted(table, key=lambda k: (order.get(k[0], 99), k[1] != "fp32", k[1], k[2]))
    return {k: table[k] for k in keys}


def _t(row: dict[str, Any] | None) -> str:
    if not row or "median_s" not in row:
        return "—"
    return f"{row['median_s']:.2f}"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """time(a) / time(b), or None when either is missing."""
    if a and b and "median_s" in a and "median_s" in b:
        return float(a["median_s"]) / float(b["median_s"])
    return None


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def budget_bytes(res: dict[str, Any], row: dict[str, Any]) -> float:
    """interpreter + torch import + 3 × the largest tensor (in its stored dtype)."""
    return float(res["baseline"]["peak_anon_bytes"]) + 3 * float(row["largest_tensor_bytes"])


def time_table(res: dict[str, Any]) -> str:
    head = (
        "| size | dtype | N | input GB | cat s | memmap s | naive s | mergekit s | soup s "
        "| soup GB/s | soup speed ÷ memmap | soup × faster than mergekit | load |"
    )
    lines = [head, "|" + "---|" * 13]
    for (size, dtype, n), m in _index(res).items():
        soup = m.get("soup")
        gbps = soup.get("gbps") if soup else None
        load = next((r.get("loadavg_1m") for r in m.values() if "loadavg_1m" in r), None)
        lines.append(
            f"| {size} | {dtype} | {n} | {next(iter(m.values()))['input_bytes'] / 1e9:.2f} "
            f"| {_t(m.get('cat'))} | {_t(m.get('memmap'))} | {_t(m.get('naive'))} "
            f"| {_t(m.get('mergekit'))} | {_t(soup)} | {_f(gbps)} "
            f"| {_f(_ratio(m.get('memmap'), soup))} | {_f(_ratio(m.get('mergekit'), soup))} "
            f"| {_f(load)} |"
        )
    return "\n".join(lines)


def memory_table(res: dict[str, Any]) -> str:
    head = (
        "| size | dtype | N | budget MiB | memmap MiB | naive MiB | mergekit MiB | soup MiB "
        "| soup ÷ budget |"
    )
    lines = [head, "|" + "---|" * 9]
    for (size, dtype, n), m in _index(res).items():

        def mem(name: str, m: dict[str, dict[str, Any]] = m) -> str:
            row = m.get(name)
            if not row or "median_peak_anon_bytes" not in row:
                return "—"
            return f"{row['median_peak_anon_bytes'] / MiB:.0f}"

        any_row = next(iter(m.values()))
        budget = budget_bytes(res, any_row)
        soup = m.get("soup")
        frac = (
            soup["median_peak_anon_bytes"] / budget
            if soup and "median_peak_anon_bytes" in soup
            else None
        )
        lines.append(
            f"| {size} | {dtype} | {n} | {budget / MiB:.0f} | {mem('memmap')} "
            f"| {mem('naive')} | {mem('mergekit')} | {mem('soup')} | {_f(frac)} |"
        )
    return "\n".join(lines)


def cpu_table(res: dict[str, Any]) -> str:
    """CPU seconds (user/sys) per method: (user+sys)/wall near 2 means both cores are busy."""
    shown = ["memmap", "naive", "mergekit", "soup"]
    head = "| size | dtype | N | " + " | ".join(f"{m} user/sys s" for m in shown) + " |"
    lines = [head, "|" + "---|" * (3 + len(shown))]
    for (size, dtype, n), m in _index(res).items():
        cells = []
        for name in shown:
            row = m.get(name, {})
            if "median_cpu_user_s" in row:
                cells.append(f"{row['median_cpu_user_s']:.1f}/{row['median_cpu_sys_s']:.1f}")
            else:
                cells.append("—")
        lines.append(f"| {size} | {dtype} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("MET" if ok else "NOT MET")


def targets(res: dict[str, Any]) -> str:
    idx = _index(res)
    out = []
    m = idx.get(TARGET, {})
    soup = m.get("soup")
    gbps = soup.get("gbps") if soup else None
    out.append(
        f"- fp32 N=16 110M: soup ≥ 2 GB/s input: {_f(gbps)} GB/s → "
        f"{_verdict(None if gbps is None else gbps >= 2)}"
    )
    r = _ratio(m.get("memmap"), soup)
    out.append(
        f"- fp32 N=16 110M: soup ≥ 0.4× memmap limit: {_f(r)}× → "
        f"{_verdict(None if r is None else r >= 0.4)}"
    )
    for dtype in ("fp32", "bf16"):
        mm = idx.get(("110M", dtype, 16), {})
        r = _ratio(mm.get("mergekit"), mm.get("soup"))
        out.append(
            f"- {dtype} N=16 110M: soup ≥ 5× faster than mergekit: {_f(r)}× → "
            f"{_verdict(None if r is None else r >= 5)}"
        )
    over, flat = [], []
    by_group: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (size, dtype, n), mm in idx.items():
        s = mm.get("soup")
        if s and "median_peak_anon_bytes" in s:
            peak = float(s["median_peak_anon_bytes"])
            by_group[(size, dtype)].append(peak)
            if peak > budget_bytes(res, s):
                over.append(f"{size} {dtype} N={n}")
    for (size, dtype), peaks in by_group.items():
        if len(peaks) > 1:
            flat.append((f"{size} {dtype}", max(peaks) / min(peaks) - 1))
    ok = None if not by_group else not over
    out.append(
        f"- peak anon ≤ baseline + 3× largest tensor: "
        f"{'over in ' + ', '.join(over) if over else 'within everywhere measured'} → "
        f"{_verdict(ok)}"
    )
    spread = ", ".join(f"{g} +{d * 100:.0f}%" for g, d in flat)
    out.append(
        f"- peak anon flat over N (±10%): {spread or '—'} → "
        f"{_verdict(None if not flat else all(d <= 0.10 for _, d in flat))}"
    )
    st = res.get("startup", {})
    h, t = st.get("soup_help_s"), st.get("soup_tiny_n2_s")
    out.append(f"- `soup --help` < 0.5 s: {_f(h)} s → {_verdict(None if h is None else h < 0.5)}")
    out.append(
        f"- fixed start-up (tiny N=2 soup) < 2 s: {_f(t)} s → "
        f"{_verdict(None if t is None else t < 2)}"
    )
    g = res.get("greedy", {})
    if "reaverage_over_step" in g:
        r, half = float(g["reaverage_over_step"]), int(g["n"]) / 2
        out.append(
            f"- greedy step ≥ N/2× cheaper than re-averaging ({g.get('config')}, "
            f"{g.get('api')}): step {g['step_median_s']:.2f} s, re-average "
            f"{g['reaverage_s']:.2f} s → {r:.1f}× vs {half:.0f}× → {_verdict(r >= half)}"
        )
    else:
        where = g.get("api") or ", ".join(g.get("looked_for", []))
        out.append(f"- greedy step ≥ N/2× cheaper than re-averaging: {g.get('status', '—')} "
                   f"({where})")  # fmt: skip
    return "\n".join(out)


def notes(res: dict[str, Any]) -> str:
    seen, lines = set(), []
    for row in res["runs"]:
        for key in ("skipped", "note"):
            if key in row and (row["method"], row[key]) not in seen:
                seen.add((row["method"], row[key]))
                lines.append(
                    f"- {row['method']} ({row['size']} {row['dtype']} N={row['n']}…): {row[key]}"
                )
        if "check" in row:
            lines.append(
                f"- check {row['method']} {row['size']} {row['dtype']} N={row['n']}: {row['check']}"
            )
    return "\n".join(lines) or "- none"


def profile_section(res: dict[str, Any]) -> str:
    p = res.get("profile")
    if not p:
        return ""
    if "self" not in p:
        return f"\n## Profile\n\n{p}\n"
    rows = "\n".join(f"| {f} | {s * 100:.1f}% |" for f, s in p["self"])
    incl = "\n".join(f"| {f} | {s * 100:.1f}% |" for f, s in p["inclusive"])
    by_line = "\n".join(f"| {f} | {s * 100:.1f}% |" for f, s in p.get("self_lines", []))
    return (
        f"\n## py-spy profile of `soup uniform` ({p['samples']} samples, "
        f"raw stacks in {p['raw']})\n\nSelf time:\n\n| frame | share |\n|---|---|\n{rows}\n"
        f"\nSelf time by line:\n\n| line | share |\n|---|---|\n{by_line}\n"
        f"\nInclusive:\n\n| frame | share |\n|---|---|\n{incl}\n"
    )


def markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    base = res["baseline"]["peak_anon_bytes"] / MiB
    return (
        f"# Merge benchmark — {meta['started']}\n\n"
        f"git {meta['git']}, Python {meta['python']}, {meta['cpus']} CPUs, "
        f"{meta['mem_total_bytes'] / 2**30:.0f} GiB RAM, {meta['reps']} reps (median). "
        f"Load average at start {_load(meta.get('loadavg_start'))}, "
        f"at end {_load(meta.get('loadavg_end'))}.\nVersions: {meta['versions']}.\n"
        f"Baseline (interpreter + torch + safetensors import): {base:.0f} MiB anon.\n"
        f"Start-up: {res.get('startup', {})}\n\n"
        f"## Time (seconds, median; ratios > 1 favour soup where marked ×)\n\n"
        f"{time_table(res)}\n\n## Peak anonymous memory of the process tree\n\n"
        f"{memory_table(res)}\n\n## CPU time (median user/sys seconds)\n\n{cpu_table(res)}\n\n"
        f"## Targets (issue 5)\n\n{targets(res)}\n\n"
        f"## Notes\n\n{notes(res)}\n{profile_section(res)}"
    )


def _load(x: Any) -> str:
    return "—" if not x else "/".join(f"{v:.2f}" for v in x)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(res)
    groups = sorted({(s, d) for s, d, _ in idx}, key=lambda g: (g[1], g[0]))
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 7), squeeze=False)
    for col, (size, dtype) in enumerate(groups):
        ns = sorted(n for s, d, n in idx if (s, d) == (size, dtype))
        for method in METHOD_ORDER:
            pts = [(n, idx[(size, dtype, n)].get(method, {})) for n in ns]
            t = [(n, r["median_s"]) for n, r in pts if "median_s" in r]
            mem = [
                (n, r["median_peak_anon_bytes"] / MiB)
                for n, r in pts
                if "median_peak_anon_bytes" in r
            ]
            if t:
                axes[0][col].plot(*zip(*t, strict=True), marker="o", label=method)
            if mem and method != "cat":
                axes[1][col].plot(*zip(*mem, strict=True), marker="o", label=method)
        any_row = next(iter(idx[(size, dtype, ns[0])].values()))
        budget = budget_bytes(res, any_row) / MiB
        axes[1][col].axhline(budget, color="grey", ls="--", lw=1, label="budget")
        axes[1][col].set_ylim(bottom=0)
        axes[0][col].set_title(f"{size} {dtype}")
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("wall time, s (log)")
        axes[1][col].set_ylabel("peak anon MiB")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("N checkpoints")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    src.with_suffix(".md").write_text(markdown(data))
    plot(data, src.with_suffix(".png"))
    print(markdown(data))
