"""`zotune influence RUN`: attribution and self-influence of a finished run, written to RUN/influence/.

The run's recipe rebuilds its base model and its data; the trajectory is replayed from the base
(`zotune.replay`), and the per-example projections its records hold are matched with the test
rows' or training rows' own (`zotune.influence.trace`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from zotune.data import build_task_data
from zotune.data.collate import INDEX
from zotune.errors import UserError
from zotune.influence.trace import (
    Attribution,
    Batch,
    Projector,
    attribute,
    batches,
    check_attributable,
    first_order_self_influence,
    self_influence,
    spearman,
)
from zotune.recipe import load_recipe
from zotune.replay import replaying_optimizer
from zotune.rundir import write_whole
from zotune.run import build_model
from zotune.schema import DataSource
from zotune.trajectory import read_trajectory

FOLDER = "influence"
STATE = "attribution.state.json"
TOP_SHARE = 0.2  # self-influence: the share of the ranked rows inspected for the recall figure


class Run:
    """A finished ZO run: its recipe, trajectory, base model and data, ready to replay."""

    def __init__(self, run_dir: str, test_file: str | None = None):
        self.dir = Path(run_dir).expanduser()
        if not (self.dir / "recipe.yaml").is_file():
            raise UserError(f"{self.dir}: not a zotune run folder (no recipe.yaml)")
        self.recipe = load_recipe(str(self.dir / "recipe.yaml"))
        self.header, self.records = read_trajectory(self.dir)
        check_attributable(self.records, str(self.dir / "zo_trajectory.jsonl"))
        self.model, tokenizer = build_model(self.recipe)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.zo = replaying_optimizer(self.header, self.model, str(self.dir), str(self.dir / "zo_trajectory.jsonl"))
        data = self.recipe.data.model_copy(update={"balanced": False})  # every training row once, in file order
        if test_file is not None:
            data = data.model_copy(update={"eval": DataSource(path=test_file)})
        self.task = build_task_data(data, tokenizer, self.model, seed=self.recipe.train.seed,
                                    batch_size=self.recipe.train.per_device_train_batch_size)
        self.out = self.dir / FOLDER
        self.out.mkdir(exist_ok=True)

    def rows(self, dataset, batch_size: int) -> list[Batch]:
        features = [dict(row) for row in dataset]
        return list(batches(features, self.task.data_collator, batch_size, INDEX))

    def projector(self) -> Projector:
        return Projector(self.model, self.zo, self.task.compute_loss_func)


def save_attribution_state(path: Path, key: dict, state: Attribution) -> None:
    saved = dataclasses.asdict(state)
    saved["terms"] = list(saved["terms"].items())  # JSON keys are strings; the training indices are ints
    write_whole(path, json.dumps({"key": key, "state": saved}))


def load_attribution_state(path: Path, key: dict) -> Attribution | None:
    """The interrupted attribution of the same test file and sampling, else None (start over)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["key"] != key:
        return None
    state = saved["state"]
    state["terms"] = dict((k, v) for k, v in state["terms"])
    return Attribution(**state)


def attribution(run_dir: str, test_file: str, *, every: int = 1, top: int = 5, batch_size: int = 16,
                progress: bool = True) -> Path:
    """Write RUN/influence/attribution.jsonl: each test row's measured loss change, its split by
    training row (`top` proponents and opponents), and the remainder; resumes an interrupted one."""
    for name, value in (("every", every), ("top", top), ("batch-size", batch_size)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    run = Run(run_dir, test_file)
    if run.task.eval_dataset is None:
        raise UserError(f"{test_file}: no test rows")
    test = run.rows(run.task.eval_dataset, batch_size)
    state_path, key = run.out / STATE, {"test": str(Path(test_file).resolve()), "every": every}
    state = load_attribution_state(state_path, key)
    started = time.perf_counter()
    result = attribute(run.projector(), run.records, test, run.dir, every=every, state=state, progress=progress,
                       checkpoint=lambda s: save_attribution_state(state_path, key, s))
    seconds = time.perf_counter() - started
    path = run.out / "attribution.jsonl"
    test_index = [i for b in test for i in b.index]
    with path.open("w") as f:
        for row in _rows_of(result, test_index, top):
            f.write(json.dumps(row) + "\n")
    measured = [a - b for a, b in zip(result.after, result.before)]
    summary = {"test": str(test_file), "test_rows": len(test_index), "steps": len(run.records),
               "steps_measured": len(result.steps_measured), "every": every, "seconds": round(seconds, 1),
               "measured_change_mean": sum(measured) / len(measured),
               "remainder_abs_mean": sum(abs(m - a) for m, a in zip(measured, result.attributed())) / len(measured)}
    (run.out / "attribution_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    return path


def _rows_of(result: Attribution, test_index: list[int], top: int):
    attributed = result.attributed()
    for i, index in enumerate(test_index):
        terms = sorted(((value[i], key) for key, value in result.terms.items()), key=lambda term: term[0])
        measured = result.after[i] - result.before[i]
        yield {"test_index": index, "loss_before": result.before[i], "loss_after": result.after[i],
               "measured_change": measured, "attributed_change": attributed[i], "remainder": measured - attributed[i],
               "proponents": [{"train_index": k, "contribution": v} for v, k in terms[:top] if v < 0],
               "opponents": [{"train_index": k, "contribution": v} for v, k in reversed(terms[-top:]) if v > 0]}


def self_influence_scores(run_dir: str, *, directions: int = 16, checkpoints: int = 4, first_order: bool = False,
                          noisy: str | None = None, batch_size: int = 16, progress: bool = True) -> Path:
    """Write RUN/influence/self_influence.jsonl (training rows ranked by ZO self-influence, with the
    first-order TracInCP score beside it given `first_order`), a summary and a PNG."""
    for name, value in (("directions", directions), ("checkpoints", checkpoints), ("batch-size", batch_size)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    run = Run(run_dir)
    if run.zo.estimator.name != "spsa":
        raise UserError(f"{run.dir}: self-influence estimates ‖∇ℓ‖² as the mean of (∇ℓ·z)², which needs z with "
                        f"E[zzᵀ] = I: the run's estimator is {run.zo.estimator.name!r}, not 'spsa'")
    train = run.rows(run.task.train_dataset, batch_size)
    started = time.perf_counter()
    scores = self_influence(run.projector(), run.records, train, run.dir, checkpoints=checkpoints,
                            directions=directions, progress=progress)
    summary = {"rows": len(scores), "directions": directions, "checkpoints": checkpoints,
               "seconds_zo": round(time.perf_counter() - started, 1)}
    reference = None
    if first_order:
        run = Run(run_dir)  # the base weights again: the first pass replayed to the end
        started = time.perf_counter()
        reference = first_order_self_influence(run.model, run.zo, run.records, run.rows(run.task.train_dataset,
                                               batch_size), run.dir, run.task.compute_loss_func,
                                               checkpoints=checkpoints, progress=progress)
        summary["seconds_first_order"] = round(time.perf_counter() - started, 1)
        summary["spearman_zo_vs_first_order"] = spearman([scores[i] for i in scores], [reference[i] for i in scores])
    ranked = sorted(scores, key=scores.get, reverse=True)
    flagged = _noisy_indices(noisy) if noisy else None
    if flagged is not None:
        summary["noisy_rows"] = len(flagged & set(scores))
        summary["recall_top_20pct"] = _recall(ranked, flagged, TOP_SHARE)
        if reference is not None:
            summary["recall_top_20pct_first_order"] = _recall(sorted(reference, key=reference.get, reverse=True),
                                                              flagged, TOP_SHARE)
    path = run.out / "self_influence.jsonl"
    with path.open("w") as f:
        for rank, index in enumerate(ranked):
            row = {"train_index": index, "rank": rank, "score": scores[index]}
            if reference is not None:
                row["first_order"] = reference[index]
            if flagged is not None:
                row["noisy"] = index in flagged
            f.write(json.dumps(row) + "\n")
    (run.out / "self_influence_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(run.out / "self_influence.png", scores, reference, flagged)
    return path


def _noisy_indices(path: str) -> set[int]:
    """Training-row indices from a file: a JSON list, or one integer per line."""
    text = Path(path).expanduser().read_text()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [int(v) for v in text.split()]
    except ValueError as e:
        raise UserError(f"{path}: not a JSON list or one integer per line ({e})") from None
    return {int(v) for v in values}


def _recall(ranked: list[int], flagged: set[int], share: float) -> float:
    """The share of the flagged rows among the first `share` of the ranked ones."""
    present = flagged & set(ranked)
    top = set(ranked[:max(1, round(share * len(ranked)))])
    return len(top & present) / len(present) if present else float("nan")


def _plot(path: Path, scores: dict, reference: dict | None, flagged: set[int] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if flagged:
        for name, values in (("ZO self-influence", scores), ("first-order TracInCP", reference)):
            if values is None:
                continue
            ranked = sorted(values, key=values.get, reverse=True)
            found = [sum(i in flagged for i in ranked[:n]) / max(1, len(flagged & set(ranked)))
                     for n in range(len(ranked) + 1)]
            ax.plot([n / len(ranked) for n in range(len(ranked) + 1)], found, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey", label="random")
        ax.axvline(TOP_SHARE, color="grey", linewidth=0.5)
        ax.set_xlabel("share of training rows inspected, by decreasing score")
        ax.set_ylabel("share of the noisy rows found")
        ax.legend()
    else:
        ax.hist(list(scores.values()), bins=40)
        ax.set_xlabel("ZO self-influence")
        ax.set_ylabel("training rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
