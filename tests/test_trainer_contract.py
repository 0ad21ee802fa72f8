"""The Trainer's contract, held by running `ZOTrainer` and a plain `Trainer` side by side.

Written from the behaviours transformers' own tests/trainer check: the callback events and the
step each one sees, step and epoch counts, when logs and evaluations happen and what learning
rate each log carries, checkpoint rotation (`save_total_limit`), the best model and its
checkpoint (`load_best_model_at_end`), early stopping, evaluate and predict, and resume. The two
trainers update the weights differently (ZO against backprop), so losses differ; everything
the contract fixes must not. Every row of CASES runs in every ZO schedule.
"""

import pytest
import torch
from conftest import tiny_causal_lm
from datasets import Dataset
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from zotune.trainer import ZOConfig, ZOTrainer

SEQ = 12
EVENTS = ("on_train_begin", "on_epoch_begin", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save",
          "on_epoch_end", "on_train_end")


def rows(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 256, (n,), generator=g)[:, None] + 3 * torch.arange(SEQ)) % 256
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


class Recorder(TrainerCallback):
    """Every event with the step it saw and the model's mode; the learning rate of every training log."""

    def __init__(self):
        self.events, self.lrs = [], []
        for name in EVENTS:
            setattr(self, name, self._record(name))

    def _record(self, name):
        def record(args, state, control, logs=None, model=None, **kwargs):
            self.events.append((name, state.global_step, model.training))
            if name == "on_log" and logs and "learning_rate" in logs:
                self.lrs.append((state.global_step, logs["learning_rate"]))
        return record


class ConstantMetric:
    """A metric that never improves: early stopping must stop both trainers at the same step."""

    def __call__(self, eval_pred):
        return {"flat": 1.0}


BASE = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
            logging_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no")
CASES = {
    "logging and lr schedule": {},
    "epochs and evaluation": dict(max_steps=-1, num_train_epochs=2, eval_strategy="steps", eval_steps=3),
    "rotation": dict(save_strategy="steps", save_steps=2, save_total_limit=2),
    "best model at end": dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                              save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="loss"),
    "early stopping": dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                           load_best_model_at_end=True, metric_for_best_model="flat", greater_is_better=True,
                           max_steps=20),
}
SCHEDULES = ("dual", "sequential", "fused")


def run(kind: str, out, case: str, schedule: str = "dual", resume=None, **extra):
    fields = {**BASE, **CASES[case], **extra, "output_dir": str(out)}
    recorder = Recorder()
    callbacks = [recorder] + ([EarlyStoppingCallback(early_stopping_patience=2)] if case == "early stopping" else [])
    common = dict(model=tiny_causal_lm("llama"), train_dataset=rows(24, 0), eval_dataset=rows(8, 1),
                  callbacks=callbacks, compute_metrics=ConstantMetric() if case == "early stopping" else None)
    if kind == "zo":
        trainer = ZOTrainer(args=ZOConfig(**fields, zo_schedule=schedule, zo_eps=1e-2), **common)
    else:
        trainer = Trainer(args=TrainingArguments(**fields), **common)
    trainer.evaluate()  # leaves the model in eval mode: training must not depend on it
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def logged(trainer, key: str) -> list[int]:
    return [entry["step"] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", list(CASES))
def test_zotrainer_keeps_the_trainers_contract(case, schedule, tmp_path):
    zo, zo_rec = run("zo", tmp_path / "zo", case, schedule)
    fo, fo_rec = run("fo", tmp_path / "fo", case)
    assert zo_rec.events == fo_rec.events
    assert (zo.state.global_step, zo.state.max_steps, zo.state.epoch) == (fo.state.global_step, fo.state.max_steps,
                                                                           fo.state.epoch)
    assert zo_rec.lrs == fo_rec.lrs  # the same schedule, read at the same steps
    for key in ("loss", "eval_loss", "train_runtime"):
        assert logged(zo, key) == logged(fo, key), key
    if not fo.args.load_best_model_at_end:
        assert checkpoints(tmp_path / "zo") == checkpoints(tmp_path / "fo")
        return
    for trainer, kind in ((zo, "zo"), (fo, "fo")):  # which is best depends on the losses: the rule must hold
        metric = f"eval_{trainer.args.metric_for_best_model}"
        evals = [(e["step"], e[metric]) for e in trainer.state.log_history if metric in e]
        pick = (max if trainer.args.greater_is_better else min)(evals, key=lambda e: e[1])  # the first best
        best = trainer.state.best_model_checkpoint
        assert best.endswith(f"checkpoint-{pick[0]}") and trainer.state.best_metric == pick[1], kind
        kept = checkpoints(tmp_path / kind)
        last = f"checkpoint-{trainer.state.global_step}"
        if trainer.args.save_total_limit == 1:  # the best alone: the last is dropped at the end
            assert kept == [best.rsplit("/", 1)[-1]], kind
        else:
            assert best.rsplit("/", 1)[-1] in kept and last in kept, kind


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_evaluate_and_predict_answer_as_the_trainers_do(schedule, tmp_path):
    zo, _ = run("zo", tmp_path / "zo", "logging and lr schedule", schedule)
    fo, _ = run("fo", tmp_path / "fo", "logging and lr schedule")
    data = rows(6, 2)
    assert zo.evaluate(data).keys() == fo.evaluate(data).keys()
    zo_pred, fo_pred = zo.predict(data), fo.predict(data)
    assert zo_pred.predictions.shape == fo_pred.predictions.shape and zo_pred.metrics.keys() == fo_pred.metrics.keys()
    assert (zo_pred.label_ids == fo_pred.label_ids).all()
    # predict runs the model as trained: its loss is the loss of the weights in memory
    with torch.no_grad():
        batch = {k: torch.tensor(v) for k, v in data[:6].items()}
        expected = zo.model.eval()(**batch).loss.item()
    assert zo_pred.metrics["test_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_resume_continues_as_the_trainer_does(schedule, tmp_path):
    """Interrupted at step 4's checkpoint (max_steps 4), resumed to 6: the resumed run sees the
    same events and steps as a resumed plain Trainer."""
    resumed = {}
    for kind in ("zo", "fo"):
        out = tmp_path / kind
        run(kind, out, "rotation", schedule, max_steps=4)
        resumed[kind] = run(kind, out, "rotation", schedule, resume=str(out / "checkpoint-4"))
    (zo, zo_rec), (fo, fo_rec) = resumed["zo"], resumed["fo"]
    assert zo_rec.events == fo_rec.events and zo.state.global_step == fo.state.global_step == 6
    assert checkpoints(tmp_path / "zo") == checkpoints(tmp_path / "fo")
