"""`zotune plot RUN`: a ZO run over its steps as a PNG, from its trajectory and the Trainer's log.

Panels, against the Trainer's step (1 = after the first update):
- the losses at θ + εz and θ − εz of every step (their mean is what the Trainer logs as the
  training loss, drawn over them at its logging steps); a reward run's mean rewards instead;
- the projected gradient g of every step (the mean over its directions); a step whose
  losses were not finite has none and is marked at the bottom of the panel;
- the evaluation metrics the Trainer logged, if it evaluated.

`zotune train` writes RUN/zo_plot.png at the end of every ZO run; `zotune plot` writes it for
any run directory that holds a trajectory (its Trainer log, trainer_state.json, is optional).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from zotune.errors import UserError
from zotune.trajectory import FILENAME, read_trajectory

PLOT = "zo_plot.png"
STATE = "trainer_state.json"  # written by Trainer.save_state()
NOT_METRICS = ("_runtime", "_per_second", "_preparation_time", "epoch")  # logged beside the metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plot of RUN (to RUN/zo_plot.png unless `out`); returns its path."""
    run = Path(run_dir).expanduser()
    if not (run / FILENAME).is_file():
        raise UserError(f"{run_dir}: no {FILENAME}; `zotune plot` needs the output directory of a ZO run "
                        "(a recipe with zo.trajectory on, the default)")
    header, records = read_trajectory(run / FILENAME)
    sign, value = (-1, "mean reward") if header.get("reward") else (1, "loss")  # a reward run logs −reward
    history = _log_history(run)
    evals = _eval_series(history)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 + bool(evals), 1, figsize=(7, 2.6 * (2 + bool(evals))), sharex=True, squeeze=False)
    losses, grads = axes[0][0], axes[1][0]
    steps = [r["step"] + 1 for r in records]
    losses.plot(steps, [sign * statistics.fmean(r["loss_plus"]) for r in records], lw=0.8, label=f"{value} at θ + εz")
    losses.plot(steps, [sign * statistics.fmean(r["loss_minus"]) for r in records], lw=0.8, label=f"{value} at θ − εz")
    logged = [(h["step"], sign * h["loss"]) for h in history if "loss" in h]
    if logged:
        losses.plot(*zip(*logged), "k.-", label=f"training {value} (logged)")
    losses.set_ylabel(value)
    losses.legend(fontsize=8)

    finite = [(s, statistics.fmean(r["g"])) for s, r in zip(steps, records) if r["g"] is not None]
    if finite:
        grads.plot(*zip(*finite), lw=0.8)
    skipped = [s for s, r in zip(steps, records) if r["g"] is None]
    if skipped:
        grads.plot(skipped, [grads.get_ylim()[0]] * len(skipped), "rx", label="non-finite: not applied")
        grads.legend(fontsize=8)
    grads.axhline(0, color="grey", lw=0.5)
    grads.set_ylabel("projected gradient g")

    if evals:
        metrics = axes[2][0]
        for name, series in evals.items():
            metrics.plot(*zip(*series), "o-", label=name)
        metrics.set_ylabel("evaluation")
        metrics.legend(fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else run / PLOT
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log_history(run: Path) -> list[dict]:
    state = run / STATE
    if not state.is_file():
        return []
    try:
        return json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{state}: not a Trainer state file ({e})") from None


def _eval_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(NOT_METRICS) and isinstance(value, (int, float)):
                series.setdefault(key, []).append((entry["step"], value))
    return series
