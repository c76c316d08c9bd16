"""Tables and plot of `bench_scale.py` (issue 13): one row per (size, recipe), then the
targets as ratios (≤ 1 meets a target)."""

from __future__ import annotations

from pathlib import Path

from make_inputs import SIZES

MiB = 1 << 20


def table(rows: list[dict], base: dict[str, int]) -> str:
    """Markdown: one row per (size, method), then the targets as ratios."""
    by = {(r["size"], r["method"]): r for r in rows if not r.get("skipped")}
    lines = [
        f"Baselines: `python -c pass` {base['python'] / MiB:.0f} MiB, `import torch` "
        f"{base['torch'] / MiB:.0f} MiB peak RssAnon.", "",
        "| size | recipe | wall s | peak RssAnon MiB | ÷ budget | notes |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']} | {r['method']} | – | – | – | skipped |")
            continue
        budget = base["torch"] + 4 * 4 * r["largest"]
        notes = "" if r["rc"] == 0 else f"exit {r['rc']}: {r['stderr'].strip().splitlines()[-1:]}"
        if r["steps_s"]:
            notes += "steps " + ", ".join(f"{s:.2f}" for s in r["steps_s"]) + " s"
        if len(r.get("reps_s", [])) > 1:
            notes += "median of " + ", ".join(f"{s:.1f}" for s in r["reps_s"]) + " s"
            warm = ", ".join(f"{s:.1f}" for s in r.get("warm_s", []))
            notes += f" (each after a `cat` of the 5 inputs taking {warm} s)" if warm else ""
        if "load" in r:
            notes += f"{'; ' if notes else ''}load {r['load']:.1f} after"
        ratio = "" if r["method"].startswith("cat") else f"{r['peak_anon'] / budget:.2f}"
        lines.append(f"| {r['size']} | {r['method']} | {r['wall_s']:.1f} | "
                     f"{r['peak_anon'] / MiB:.0f} | {ratio} | {notes} |")  # fmt: skip
    lines += ["", "| target | measured | ratio (≤ 1 meets it) |", "|---|---|---|"]
    sizes = sorted({r["size"] for r in rows}, key=lambda s: SIZES[s].n_params())
    for size in sizes:
        cat, greedy = by.get((size, "cat")), by.get((size, "greedy"))
        hot = by.get((size, "cat, page cache"))
        for name in ("greedy", "greedy, sum in memory"):
            g = by.get((size, name))
            if cat and g and g["steps_s"]:
                speed = cat["input_bytes"] / cat["wall_s"]
                one = cat["input_bytes"] / 4
                limit = 1.5 * 2 * one / speed
                worst = max(g["steps_s"])
                cached = ""
                if hot:
                    cache_speed = hot["input_bytes"] / hot["wall_s"]
                    fast = 1.5 * 2 * one / cache_speed
                    cached = (f" (at the page cache's {cache_speed / 1e9:.1f} GB/s: "
                              f"{fast:.2f} s, {worst / fast:.1f})")  # fmt: skip
                lines.append(f"| {size} {name} step ≤ 1.5 × (read + write {one / 1e9:.2f} GB "
                             f"each) at cat {speed / 1e9:.2f} GB/s from the disk = "
                             f"{limit:.2f} s | slowest step {worst:.2f} s | "
                             f"{worst / limit:.2f}{cached} |")  # fmt: skip
        uni, stock = by.get((size, "uniform")), by.get((size, "stock"))
        if uni and stock:
            rounds = zip(stock.get("reps_s", []), uni.get("reps_s", []), strict=True)
            each = ", ".join(f"{s / u:.2f}" for s, u in rounds)
            lines.append(
                f"| {size} stock wall ≤ 2 × uniform (medians of {len(uni.get('reps_s', [1]))} "
                f"interleaved rounds, inputs in the page cache) | {stock['wall_s']:.1f} vs "
                f"{uni['wall_s']:.1f} s (stock ÷ uniform per round: {each}) | "
                f"{stock['wall_s'] / (2 * uni['wall_s']):.2f} |"
            )
        g2 = by.get((size, "greedy N=2"))
        if greedy and g2:
            d = greedy["peak_anon"] - g2["peak_anon"]
            lines.append(f"| {size} greedy N=4 peak ≈ N=2 (± 64 MiB) | "
                         f"{greedy['peak_anon'] / MiB:.0f} vs {g2['peak_anon'] / MiB:.0f} MiB | "
                         f"{abs(d) / (64 * MiB):.2f} |")  # fmt: skip
    if len(sizes) == 2:
        small, big = (by.get((s, "greedy")) for s in sizes)
        if small and big:
            growth = 4 * (big["largest"] - small["largest"])  # float32 bytes
            d = big["peak_anon"] - small["peak_anon"]
            lines.append(f"| greedy {sizes[0]} → {sizes[1]} peak growth ≤ 4 × largest tensor's "
                         f"growth ({4 * growth / MiB:.0f} MiB) | {d / MiB:+.0f} MiB | "
                         f"{max(d, 0) / (4 * growth):.2f} |")  # fmt: skip
    failed = [r for r in rows if not r.get("skipped") and r["rc"] != 0]
    for r in failed:
        lines.append(f"\n{r['size']} {r['method']} failed: `{r['stderr'].strip()[-300:]}`")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], base: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped") and not r["method"].startswith("cat")]
    sizes = sorted({r["size"] for r in done}, key=lambda s: SIZES[s].n_params())
    names = list(dict.fromkeys(r["method"] for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(sizes), 1)
    for j, size in enumerate(sizes):
        got = {r["method"]: r for r in done if r["size"] == size}
        xs = [i + j * width for i in range(len(names))]
        axes[0].bar(xs, [got[n]["peak_anon"] / MiB if n in got else 0 for n in names], width,
                    label=size)  # fmt: skip
        axes[1].bar(xs, [got[n]["wall_s"] if n in got else 0 for n in names], width, label=size)
        largest = SIZES[size].largest_tensor_numel()
        axes[0].axhline((base["torch"] + 16 * largest) / MiB, ls="--", color=f"C{j}", lw=1)
    for ax, title in zip(axes, ["peak RssAnon (MiB); dashed: import torch + 4 × largest fp32",
                                "wall (s)"], strict=True):  # fmt: skip
        ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
