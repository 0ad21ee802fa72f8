"""A reward step with the whole population in one `generate` (dual) against its members one after the other
(sequential), through the trainer `zotune train reward-es` builds, side by side in one process.

    python benchmarks/population_step.py                       # the shipped recipe, Gemma 3 270M, fp32
    python benchmarks/population_step.py model.peft=null train.learning_rate=5e-7 zo.eps=1e-3   # all weights

Each round trains a fresh copy of the recipe's model and trainer for `--steps` steps with each schedule,
in the order dual, sequential, sequential, dual (a 2-core machine's speed drifts over minutes; the mirrored
order cancels a steady drift). A step's time runs from the Trainer's `on_step_begin` to its `on_step_end`:
the population's generations, the rewards, the update. The first step of every run is warm-up and
is reported apart. Sequential is `zo.schedule=sequential zo.slice_directions=false`: each member moves the
weights in place and generates alone, as the ES implementations do (Qiu et al. 2025's original code).
The floor beside them: the unperturbed model generating a step's rows (a batch the training loader draws,
repeated once per member) in one `generate`, timed after every run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

import host
from zotune.recipe import load_recipe
from zotune.run import build_model, build_trainer

SCHEDULES = {"dual": [], "sequential": ["zo.schedule=sequential", "zo.slice_directions=false"]}


class StepClock(TrainerCallback):
    """Seconds of every training step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def run(schedule: str, overrides: list[str], steps: int) -> tuple[list[float], float]:
    """The step times of one training run, and the seconds of one plain `generate` of a step's rows after it."""
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe("reward-es", [*overrides, *SCHEDULES[schedule], f"train.max_steps={steps}",
                                           "train.evaluate_before=false", "data.eval=null", "train.save_steps=100000",
                                           "train.logging_steps=100000", f"train.output_dir={out}"])
        model, tokenizer = build_model(recipe)
        trainer, _ = build_trainer(recipe, model, tokenizer)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        return clock.seconds, plain_generate(trainer, recipe.zo.num_directions * 2)


def plain_generate(trainer, members: int) -> float:
    """Seconds of the unperturbed model generating a step's rows (a batch the training loader draws, repeated
    once per member) at once, sampled as the members sample."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = {key: batch[key].repeat(members, 1) for key in ("input_ids", "attention_mask")}
    trainer.flush()
    trainer.model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        trainer.scorer.completions(trainer.model, rows, sampling_seed=0, prompts=len(batch["input_ids"]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides of reward-es, as zotune train takes them")
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of dual, sequential, sequential, dual")
    args = parser.parse_args()
    print(host.line())
    print(f"# reward-es {' '.join(args.overrides)} · {args.steps} steps a run · {args.rounds} round(s)")
    steady = {name: [] for name in SCHEDULES}
    warm = {name: [] for name in SCHEDULES}
    floor = []
    for _ in range(args.rounds):
        for schedule in ("dual", "sequential", "sequential", "dual"):
            seconds, generate = run(schedule, args.overrides, args.steps)
            warm[schedule].append(seconds[0])
            steady[schedule].extend(seconds[1:])
            floor.append(generate)
            print(f"{schedule:<11} steps {' '.join(f'{s:.2f}' for s in seconds)} s · plain generate {generate:.2f} s",
                  flush=True)
    median = {name: statistics.median(times) for name, times in steady.items()}
    for name in SCHEDULES:
        print(f"{name:<11} steady {median[name]:.2f} s a step (median of {len(steady[name])}), "
              f"first step {statistics.median(warm[name]):.2f} s")
    print(f"plain generate of a step's rows: {statistics.median(floor):.2f} s (median of {len(floor)})")
    print(f"sequential / dual: {median['sequential'] / median['dual']:.2f}x")


if __name__ == "__main__":
    main()
