"""`zotune train`: a validated recipe in, a fine-tuned model and a summary out."""

from __future__ import annotations

import functools
import json
import logging
import resource
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import Trainer
from transformers.utils import logging as hf_logging

from zotune.checkpoints import (
    TRAINER_STATE, damage, exit_interrupted, finish_writing, resume_command, save_checkpoint_atomically,
    save_on_interrupt,
)
from zotune.data import build_task_data
from zotune.errors import UserError
from zotune.failures import describe as describe_failure
from zotune.model_card import SUMMARY
from zotune.models import load_model, stable_name, trainable_parameters
from zotune.plot import plot_run
from zotune.preflight import cpu_ranks, launched_ranks, preflight, training_arguments
from zotune.recipe import dump_recipe
from zotune.rundir import CHECKPOINT, RECIPE, RunFolder, claim, follow, write_whole
from zotune.schema import Recipe
from zotune.trainer import ZOTrainer

console = Console()


def build_model(recipe: Recipe, tokenizer=None):
    """The model and tokenizer of a recipe, with only the recipe's parameters left trainable (`tokenizer`:
    one its checks loaded, see `load_model`)."""
    verbalizer = recipe.data.verbalizer
    params = recipe.params
    model, tokenizer = load_model(
        recipe.model, num_labels=len(verbalizer) if verbalizer else None, seed=recipe.train.seed,
        unfreeze=params.unfreeze, tokenizer=tokenizer,
    )
    unfrozen = [stable_name(n) for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    chosen = {name for name, _ in trainable_parameters(model, params.include, params.exclude)}
    dropped = [name for name in unfrozen if name not in chosen]
    if params.unfreeze and dropped:
        raise UserError(
            f"params.unfreeze: {dropped[0]} is unfrozen, then params.include/exclude drop it; "
            "widen params.include or narrow params.unfreeze"
        )
    return model, tokenizer


def build_trainer(recipe: Recipe, model, tokenizer) -> tuple[Trainer, str]:
    """The trainer of the recipe's method, and the name of the eval metric to report."""
    train = recipe.train
    task = build_task_data(
        recipe.data,
        tokenizer,
        model,
        seed=train.seed,
        batch_size=train.per_device_train_batch_size,
        num_rows_needed=(train.max_steps * train.per_device_train_batch_size * train.gradient_accumulation_steps
                         * launched_ranks()),
    )
    if recipe.data.task == "reward":
        return _reward_trainer(recipe, model, tokenizer, task), f"eval_{task.metric}"
    trainer_class = ZOTrainer if recipe.method == "zo" else Trainer
    trainer = trainer_class(
        model=model,
        args=training_arguments(recipe, task),
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        data_collator=task.data_collator,
        processing_class=tokenizer,
        compute_loss_func=task.compute_loss_func,
        compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
    )
    if task.compute_loss_func is not None:
        # our loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps
        trainer.loss_is_scaled_for_ga = False
    return trainer, f"eval_{task.metric}"


def _reward_trainer(recipe: Recipe, model, tokenizer, task) -> Trainer:
    from zotune.reward.population import Generation
    from zotune.reward.trainer import ZORewardTrainer

    reward = recipe.reward
    return ZORewardTrainer(model=model, args=training_arguments(recipe, task), train_dataset=task.train_dataset,
                           eval_dataset=task.eval_dataset, processing_class=tokenizer, reward_funcs=reward.functions,
                           reward_weights=reward.weights,
                           generation=Generation(reward.max_new_tokens, tuple(reward.stop),
                                                 reward.temperature or None))


def peak_memory_gib() -> float:
    """Peak resident memory of this process (and, on CUDA, peak allocated GPU memory)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(recipe: Recipe, source: str, *, overwrite: bool = False) -> dict:
    """Run a recipe end to end in the output folder it claims; returns the summary it prints.

    A full disk or an unwritable folder, wherever it strikes, is a `UserError` saying how to resume."""
    checked = preflight(recipe, run_user_code=True)  # every check that needs no weights, before any load
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.set_verbosity_warning()
    out = Path(recipe.train.output_dir)
    resume = recipe.train.resume_from_checkpoint
    phase = Phase("claiming the output folder")
    try:
        folder = _claim_once(out, dump_recipe(_without_resume(recipe)), seed=recipe.train.seed,
                             resuming=resume is not None, overwrite=overwrite)
        try:
            return _train_in(folder, recipe, source, phase, checked.tokenizer)
        finally:
            folder.release()
    except Exception as e:
        what = describe_failure(e, out)
        if what is None:
            raise
        then = f"resume with: {resume_command(out)}" if (out / RECIPE).is_file() else "run the same command again"
        raise UserError(f"{what}, while {phase.now}; once fixed, {then}") from None


def _claim_once(out: Path, recipe_text: str, **how) -> RunFolder:
    """Claim OUT; under torchrun or accelerate launch the main process claims it and the other ranks
    follow once it has (their process group is the one the Trainer then uses)."""
    if launched_ranks() == 1:
        return claim(out, recipe_text, **how)
    from accelerate import PartialState

    state = PartialState(cpu=cpu_ranks())
    folder = claim(out, recipe_text, **how) if state.is_main_process else None
    state.wait_for_everyone()
    return folder if folder is not None else follow(out)


class Phase:
    """What the run is doing, for the message of a failure."""

    def __init__(self, now: str):
        self.now = now


def _without_resume(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume_from_checkpoint": None})})


def _train_in(folder: RunFolder, recipe: Recipe, source: str, phase: Phase, tokenizer) -> dict:
    out = folder.path
    phase.now = f"writing {out / RECIPE}"
    if folder.main:
        write_whole(out / RECIPE, dump_recipe(recipe, source))

    phase.now = "loading the model"
    console.print(f"[bold]zotune[/] {recipe.method} · loading the model")
    if recipe.method == "scalebio":
        from zotune.bilevel import run_scalebio
        from zotune.bilevel.loop import STATE_FILE

        verbalizer = recipe.data.verbalizer  # w and u are chosen from params.include/exclude there
        model, tokenizer = load_model(recipe.model, num_labels=len(verbalizer) if verbalizer else None,
                                      seed=recipe.train.seed, unfreeze=recipe.params.unfreeze, tokenizer=tokenizer)
        checkpoint = _checkpoint_to_resume(folder, recipe.train.resume_from_checkpoint, STATE_FILE)
        phase.now = "training"
        summary = run_scalebio(recipe, model, tokenizer, checkpoint=checkpoint, console=console)
        summary["peak_memory_gib"] = round(peak_memory_gib(), 2)
        _print_summary(summary)
        return summary
    model, tokenizer = build_model(recipe, tokenizer)
    trainer, metric = build_trainer(recipe, model, tokenizer)
    if not isinstance(trainer, ZOTrainer):  # ZOTrainer's checkpoints are atomic and stamped already
        trainer._save_checkpoint = functools.partial(save_checkpoint_atomically, trainer, trainer._save_checkpoint)
    has_eval = trainer.eval_dataset is not None
    checkpoint = _checkpoint_to_resume(folder, recipe.train.resume_from_checkpoint)

    phase.now = "evaluating before training"
    before = trainer.evaluate() if has_eval and recipe.train.evaluate_before else {}
    phase.now = f"training (writing checkpoints and the log in {out})"
    start = time.perf_counter()
    interrupt = save_on_interrupt(trainer)  # Ctrl-C: stop after the step, save a checkpoint, exit 130
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if interrupt.checkpoint is not None:
        exit_interrupted(f"interrupted at step {trainer.state.global_step}: saved {interrupt.checkpoint}; "
                         f"resume with: {resume_command(out)}")
    elapsed = time.perf_counter() - start
    steps_run = trainer.state.global_step - (int(CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else 0)

    phase.now = "the final evaluation"
    interrupted = None
    try:
        after = trainer.evaluate() if has_eval else {}
    except KeyboardInterrupt:  # training is done: keep its weights, drop the evaluation
        interrupted, after = "during the final evaluation", {}
    phase.now = f"saving the model to {out}"
    with finish_writing(f"the trained model to {out}") as deferred:
        trainer.save_model(str(out))  # on every rank: a sharded model is gathered for it
        if not folder.main:  # the rest is the main process's
            return {}
        tokenizer.save_pretrained(str(out))
        trainer.save_state()  # trainer_state.json: the log `zotune plot` draws the evaluations from
        if isinstance(trainer, ZOTrainer) and trainer.trajectory.writer is not None:
            console.print(f"plot of the run: {plot_run(out)}")
        summary = {
            "method": recipe.method,
            "steps": trainer.state.global_step,
            "train_seconds": round(elapsed, 1),
            "seconds_per_step": round(elapsed / max(steps_run, 1), 3),  # of the steps this run took
            "peak_memory_gib": round(peak_memory_gib(), 2),
            f"{metric}_before": before.get(metric),
            f"{metric}_after": after.get(metric),
            "output_dir": str(out),
        }
        if isinstance(trainer, ZOTrainer):
            summary["nonfinite_steps"] = trainer.stats.nonfinite.total
        write_whole(out / SUMMARY, json.dumps(summary, indent=1) + "\n")  # for the model card of an export
    if interrupted or deferred.requested:
        exit_interrupted(f"interrupted {interrupted or 'while saving'}: the trained model is saved in {out}"
                         + (" without its final evaluation" if interrupted else ""))
    _print_summary(summary)
    return summary


def _checkpoint_to_resume(folder: RunFolder, resume: str | None, state_file: str = TRAINER_STATE) -> Path | None:
    """The checkpoint the run continues from, checked: this run's, and whole (`damage`, with the state
    file of the checkpoint's kind)."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoint = folder.latest_checkpoint()
        if checkpoint is None:  # e.g. a crash before the first save
            console.print(f"no checkpoint of this run in {folder.path} yet: training from the start")
            return None
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise UserError(f"train.resume_from_checkpoint: {resume}: no such checkpoint folder")
        folder.check_checkpoint(checkpoint)
    problem = damage(checkpoint, state_file)
    if problem is not None:
        intact = [p for step, p in folder.checkpoints_before(checkpoint) if damage(p, state_file) is None]
        instead = (f"resume from the last intact one: train.resume_from_checkpoint={intact[-1]}" if intact
                   else "no earlier checkpoint of this run is intact: start over with --overwrite")
        raise UserError(f"{checkpoint} is damaged ({problem}); {instead}")
    return checkpoint


def _print_summary(summary: dict) -> None:
    table = Table(title="zotune summary", show_header=False, box=None)
    for key, value in summary.items():
        shown = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)
