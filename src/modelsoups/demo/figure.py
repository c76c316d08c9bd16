"""figure.png in the style of the paper's Figure 1: test accuracy (x) vs shift accuracy (y).

Ingredients are grey dots, the shared LP init a black square, the best individual a ringed
dot, and the soups and the ensemble are stars: a soup up and to the right of every
ingredient is what the paper shows. One panel per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import write_atomic

__all__ = ["write_figure"]

STARS = {  # method -> (label, colour)
    "uniform_soup": ("uniform soup", "tab:blue"),
    "greedy_soup": ("greedy soup", "tab:red"),
    "learned_soup": ("learned soup", "tab:purple"),
    "ensemble": ("ensemble (logits)", "tab:orange"),
    "greedy_ensemble": ("greedy ensemble", "gold"),
    "wise_ft": ("WiSE-FT α=0.5 (LP init, best)", "tab:green"),
}


def _panel(ax: Any, seed: dict[str, Any], sizes: bool) -> None:
    """Draw one seed's ingredients, init, best individual, soups and ensemble."""
    m = seed["methods"]
    xs = [100 * i["test"] for i in seed["ingredients"]]
    ys = [100 * i["shift"] for i in seed["ingredients"]]
    ax.scatter(xs, ys, s=28, c="0.55", label="fine-tuned ingredients", zorder=2)
    best = m["best_individual"]
    ax.scatter(
        100 * best["test"],
        100 * best["shift"],
        s=110,
        facecolors="none",
        edgecolors="black",
        linewidths=1.4,
        label="best individual (held-out)",
        zorder=3,
    )
    lp = m["lp_init"]
    ax.scatter(
        100 * lp["test"],
        100 * lp["shift"],
        marker="s",
        s=50,
        c="black",
        label="LP init (shared start)",
        zorder=3,
    )
    for name, (label, colour) in STARS.items():
        if name in m and m[name].get("test") is not None:
            size = m[name].get("size")
            text = f"{label} ({size})" if sizes and name != "wise_ft" else label
            ax.scatter(
                100 * m[name]["test"],
                100 * m[name]["shift"],
                marker="*",
                s=260,
                c=colour,
                edgecolors="black",
                linewidths=0.6,
                label=text,
                zorder=4,
            )
    ax.set_title(f"seed {seed['seed']}", fontsize=10)
    ax.grid(alpha=0.3)


def write_figure(report: dict[str, Any], path: Path) -> None:
    """Write figure.png: one panel per seed, shared legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = report["seeds"]
    cols = min(len(seeds), 3)
    rows = (len(seeds) + cols - 1) // cols
    ncol = 2 if cols == 1 else 4
    legend_rows = (len(STARS) + 3 + ncol - 1) // ncol
    height = 4.6 * rows + 0.22 * legend_rows + 0.7
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, 5.2 * cols), height), squeeze=False)
    for ax, seed in zip(axes.flat, seeds, strict=False):
        _panel(ax, seed, sizes=len(seeds) == 1)  # sizes differ between seeds
    for ax in list(axes.flat)[len(seeds) :]:
        ax.axis("off")
    for ax in axes.flat:
        ax.set_xlabel("test accuracy (%) — unseen movies")
    for ax in axes[:, 0]:
        ax.set_ylabel("shift accuracy (%) — test snippets with typos")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle("Model soups: all-MiniLM-L6-v2 on Rotten Tomatoes (cf. paper Fig. 1)", fontsize=11)
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / height, 1, 1))
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    finally:
        plt.close(fig)
