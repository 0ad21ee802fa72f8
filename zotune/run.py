"""`zotune train`: a validated recipe in, a fine-tuned model and a summary out."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from zotune.checkpoints import exit_interrupted, save_on_interrupt
from zotune.data import build_task_data
from zotune.errors import UserError
from zotune.model_card import SUMMARY
from zotune.models import load_model, stable_name, trainable_parameters
from zotune.plot import plot_run
from zotune.preflight import RUN_ONLY, method_arguments, preflight, training_arguments  # noqa: F401
from zotune.recipe import dump_recipe
from zotune.schema import Recipe
from zotune.trainer import ZOTrainer

console = Console()


def build_model(recipe: Recipe):
    """The model and tokenizer of a recipe, with only the recipe's parameters left trainable."""
    verbalizer = recipe.data.verbalizer
    params = recipe.params
    model, tokenizer = load_model(
        recipe.model, num_labels=len(verbalizer) if verbalizer else None, seed=recipe.train.seed,
        unfreeze=params.unfreeze,
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
        num_rows_needed=train.max_steps * train.per_device_train_batch_size * train.gradient_accumulation_steps,
    )
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


def peak_memory_gib() -> float:
    """Peak resident memory of this process (and, on CUDA, peak allocated GPU memory)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(recipe: Recipe, source: str) -> dict:
    """Run a recipe end to end; returns the summary it prints."""
    preflight(recipe, run_user_code=True)  # every check that needs no weights, before any load
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.set_verbosity_warning()
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe, source))

    console.print(f"[bold]zotune[/] {recipe.method} · loading the model")
    if recipe.method == "scalebio":
        from zotune.bilevel import run_scalebio

        verbalizer = recipe.data.verbalizer  # w and u are chosen from params.include/exclude there
        model, tokenizer = load_model(recipe.model, num_labels=len(verbalizer) if verbalizer else None,
                                      seed=recipe.train.seed, unfreeze=recipe.params.unfreeze)
        summary = run_scalebio(recipe, model, tokenizer, console=console)
        summary["peak_memory_gib"] = round(peak_memory_gib(), 2)
        _print_summary(summary)
        return summary
    model, tokenizer = build_model(recipe)
    trainer, metric = build_trainer(recipe, model, tokenizer)
    has_eval = trainer.eval_dataset is not None

    before = trainer.evaluate() if has_eval and recipe.train.evaluate_before else {}
    start = time.perf_counter()
    resume = recipe.train.resume_from_checkpoint
    interrupt = save_on_interrupt(trainer)  # Ctrl-C: stop after the step, save a checkpoint, exit 130
    if resume == "latest":
        resume = get_last_checkpoint(str(out))
        if resume is None:  # e.g. a crash before the first save
            console.print(f"no checkpoint in {out} yet: training from the start")
    trainer.train(resume_from_checkpoint=resume)
    if interrupt.checkpoint is not None:
        exit_interrupted(interrupt.checkpoint, source)
    elapsed = time.perf_counter() - start
    after = trainer.evaluate() if has_eval else {}
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    trainer.save_state()  # trainer_state.json: the log `zotune plot` draws the evaluations from
    if isinstance(trainer, ZOTrainer) and trainer.trajectory is not None:
        console.print(f"plot of the run: {plot_run(out)}")

    summary = {
        "method": recipe.method,
        "steps": trainer.state.global_step,
        "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(trainer.state.global_step, 1), 3),
        "peak_memory_gib": round(peak_memory_gib(), 2),
        f"{metric}_before": before.get(metric),
        f"{metric}_after": after.get(metric),
        "output_dir": str(out),
    }
    if isinstance(trainer, ZOTrainer):
        summary["nonfinite_steps"] = trainer.nonfinite_steps
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")  # for the model card of an export
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    table = Table(title="zotune summary", show_header=False, box=None)
    for key, value in summary.items():
        shown = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)
