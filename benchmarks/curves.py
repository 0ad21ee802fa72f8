"""A results file's runs as curves against training seconds, one line per run (quality.py, reward.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def plot_against_seconds(path: Path, rows: list[dict], *, label: Callable[[dict], str], before: str, value: str,
                         ylabel: str, title: str) -> Path:
    """PATH.png: each row's `before` at 0 s, then its points' `value`, one colour per `label`; returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(dict.fromkeys(map(label, rows))):
        runs = [r for r in rows if label(r) == name]
        for j, r in enumerate(runs):  # one colour a group, one line a seed
            ax.plot([0] + [p["seconds"] for p in r["points"]], [r[before]] + [p[value] for p in r["points"]],
                    marker="o", color=f"C{i % 10}", label=f"{name} (seeds {', '.join(str(r['seed']) for r in runs)})"
                    if j == 0 else None)
    ax.set_xlabel("training seconds (2 CPU cores; evaluations not counted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    return png
