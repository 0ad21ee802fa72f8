"""A results file's runs as curves against training seconds, one line per run (quality.py, reward.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def plot_against_seconds(path: Path, rows: list[dict], *, label: Callable[[dict], str], before: str, value: str,
                         ylabel: str, title: str) -> Path:
    """PATH.png: each row's `before` at 0 s, then its points' `value`, grouped by `label`; returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(map(label, rows)):
        for r in (r for r in rows if label(r) == name):
            ax.plot([0] + [p["seconds"] for p in r["points"]], [r[before]] + [p[value] for p in r["points"]],
                    marker="o", label=f"{name} (seed {r['seed']})")
    ax.set_xlabel("training seconds (2 CPU cores; evaluations not counted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    return png
