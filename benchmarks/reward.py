"""Evolution strategies (zotune) against trl's GRPO on one reward: held-out mean reward against wall-clock,
peak memory, and what each forgets.

    python benchmarks/reward.py --configs es-lora,grpo-lora --seeds 0,1,2 --budget 300 --split test
    python benchmarks/reward.py --plot benchmarks/results/reward_test.jsonl

Protocol (fixed before the runs):
- Gemma 3 270M and the task of the shipped `reward-es` recipe: rotten_tomatoes reviews, the reward
  `zotune.reward.sentiment:answer` (1 for the right sentiment word, 0.2 for the other); its prompts.
- Every configuration trains for the same wall-clock budget (`--budget` seconds of training steps,
  evaluations not counted). The held-out mean reward (greedy decoding, the first `--eval-rows` reviews of
  the `--split`, validation or test, the same scorer for both) is taken every `--eval-every` seconds and at the end.
- ES: `zotune train reward-es` with its settings (`es-lora`), all weights trained (`es-full`), or the
  population decoded member by member (`es-lora-sequential`). GRPO: trl's `GRPOTrainer` with the same
  prompts, reward and completion length, the same number of completions per step (population size =
  `num_generations`), trl's defaults otherwise (sampled at temperature 1, AdamW).
- Forgetting: the zero-shot accuracy of the quickstart's prompt ("{text} It was", " great" / " terrible")
  on the first 200 rows of the validation split, before and after.
- Each run is its own process, so its peak RSS is its own. `train_peak_rss_gib` is the peak of the training
  steps alone (Linux: the peak is reset before training and after each held-out evaluation, and read before
  each); `generate` is the reference for memory: the model, unchanged, generating the batch a step
  generates (the recipe's prompts per step, repeated once per population member) for the budget.

Each run appends a JSON line to benchmarks/results/reward_<split>.jsonl; `--plot FILE` draws the held-out reward
against training seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from budgeted import Budget, add_run_arguments, print_means, run_in_child

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (trainer, recipe overrides of reward-es)
CONFIGS = {
    "es-lora": ("es", []),
    "es-lora-sequential": ("es", ["zo.schedule=sequential", "zo.slice_directions=false"]),
    "es-lora-greedy": ("es", ["reward.temperature=null"]),  # members decode greedily, as the evaluation does
    # all weights at the ES paper's sigma = 1e-3 and step alpha = 5e-4 (Qiu et al. 2025): lr = alpha * eps
    "es-full": ("es", ["model.peft=null", "zo.eps=1e-3", "train.learning_rate=5e-7"]),
    "grpo-lora": ("grpo", ["train.learning_rate=1e-4"]),
    "grpo-full": ("grpo", ["model.peft=null", "train.learning_rate=1e-6"]),
    "generate": ("generate", ["model.peft=null"]),
}


class PeakRss:
    """The peak resident set of this process since the last `reset` (Linux's VmHWM, reset through clear_refs,
    which resets getrusage's ru_maxrss too), and over the whole process (`whole`)."""

    def __init__(self):
        self.before_reset = 0.0

    def reset(self) -> None:
        self.before_reset = self.whole()
        Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GiB

    def whole(self) -> float:
        return max(self.before_reset, self.read())


def forgetting_accuracy(model, tokenizer, rows: int = 200) -> float:
    """Zero-shot accuracy of the quickstart's prompt and label words on the first `rows` validation reviews."""
    import torch

    reviews = [json.loads(line) for line in (DATA / "rotten_tomatoes/validation.jsonl").read_text().splitlines()]
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" terrible", " great")]
    right = 0
    with torch.no_grad():
        for start in range(0, rows, 16):
            batch = reviews[start:min(rows, start + 16)]
            encoded = tokenizer([f"{r['text']} It was" for r in batch], padding=True, padding_side="left",
                                return_tensors="pt")
            logits = model(**encoded, logits_to_keep=1).logits[:, -1, words]
            right += int((logits.argmax(-1) == torch.tensor([r["label"] for r in batch])).sum())
    return right / rows


def run_one(config: str, seed: int, budget: float, every: float, eval_rows: int, split: str) -> dict:
    import torch

    import host
    from zotune.data.files import load_task_rows
    from zotune.data.tasks import prompt_rows
    from zotune.recipe import load_recipe
    from zotune.reward.functions import RewardFunctions
    from zotune.reward.population import Generation, Scorer
    from zotune.run import build_model, build_trainer

    kind, overrides = CONFIGS[config]
    out = Path("/tmp") / f"zotune-reward-{config}-{seed}-{time.time_ns()}"
    recipe = load_recipe("reward-es", [*overrides, f"train.seed={seed}", "train.max_steps=100000",
                                       f"data.eval.path={DATA}/rotten_tomatoes/{split}.jsonl",
                                       f"data.eval.split={split}", f"data.eval.max_samples={eval_rows}",
                                       f"train.output_dir={out}"])
    model, tokenizer = build_model(recipe)
    scorer = Scorer(tokenizer, RewardFunctions(recipe.reward.functions),
                    Generation(recipe.reward.max_new_tokens, tuple(recipe.reward.stop)))
    train_rows, eval_source = load_task_rows(recipe.data)
    held_out = prompt_rows(eval_source, "data.eval", "validation", recipe.data)

    def held_out_reward() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(held_out), 32):
                rows = held_out[start:start + 32]
                batch = dict(tokenizer(rows["prompt"], padding=True, padding_side="left", return_tensors="pt"))
                batch.update(rows)
                total += scorer.mean_reward(batch, scorer.completions(model, batch)) * len(rows["prompt"])
        return total / len(held_out)

    peak = PeakRss()

    points, train_peak = [], [0.0]

    def mark(state, control) -> None:
        """A held-out evaluation, the steps' peak memory read before it and reset after it."""
        train_peak[0] = max(train_peak[0], peak.read())
        points.append({"seconds": round(budget_cb.spent, 1), "step": state.global_step,
                       "reward": held_out_reward() if kind != "generate" else None})
        peak.reset()

    budget_cb = Budget(budget, every, mark)
    if kind == "generate":
        return generate_only(recipe, model, tokenizer, scorer, train_rows, budget_cb, peak) | {
            "config": config, "seed": seed, "budget_s": budget, "train_peak_rss_gib": round(train_peak[0], 2),
            "host": host.describe()}
    forgot_before, reward_before = forgetting_accuracy(model, tokenizer), held_out_reward()
    if kind == "es":
        trainer_of_run, _ = build_trainer(recipe, model, tokenizer)
    else:
        from trl import GRPOConfig, GRPOTrainer

        population = 2 * recipe.zo.num_directions
        args = GRPOConfig(output_dir=str(out), num_generations=population,
                          max_completion_length=recipe.reward.max_new_tokens,
                          per_device_train_batch_size=population * recipe.train.per_device_train_batch_size,
                          learning_rate=recipe.train.learning_rate, max_steps=100000, seed=seed, report_to="none",
                          use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
                          logging_steps=5, save_strategy="no")
        trainer_of_run = GRPOTrainer(model=model, reward_funcs=scorer.rewards.functions, args=args,
                                     train_dataset=prompt_rows(train_rows, "data.train", "train", recipe.data),
                                     processing_class=tokenizer)
    trainer_of_run.add_callback(budget_cb)
    peak.reset()
    trainer_of_run.train()
    steps = trainer_of_run.state.global_step
    return {"config": config, "seed": seed, "split": split, "budget_s": budget, "reward_before": reward_before,
            "points": points, "reward": points[-1]["reward"] if points else reward_before,
            "steps": steps, "seconds_per_step": budget_cb.seconds_per_step(steps),
            "forgetting_accuracy_before": forgot_before,
            "forgetting_accuracy_after": forgetting_accuracy(model, tokenizer),
            "peak_rss_gib": round(peak.whole(), 2),
            "train_peak_rss_gib": round(train_peak[0], 2), "overrides": overrides, "host": host.describe()}


def generate_only(recipe, model, tokenizer, scorer, train_rows, budget_cb, peak) -> dict:
    """The memory reference: the unchanged model generating what one training step generates, step after
    step, for the budget (`budget_cb` counts the seconds and reads the peak as a training run's does)."""
    import torch
    from transformers import TrainerControl, TrainerState

    from zotune.data.tasks import prompt_rows

    prompts = prompt_rows(train_rows, "data.train", "train", recipe.data)["prompt"]
    rows, members = recipe.train.per_device_train_batch_size, 2 * recipe.zo.num_directions
    state, control = TrainerState(), TrainerControl()
    model.eval()
    peak.reset()
    with torch.no_grad():
        while not control.should_training_stop:
            start = state.global_step * rows % len(prompts)
            batch = dict(tokenizer(prompts[start:start + rows] * members, padding=True, padding_side="left",
                                   return_tensors="pt"))
            budget_cb.on_step_begin(None, state, control)
            scorer.completions(model, batch)
            state.global_step += 1
            budget_cb.on_step_end(None, state, control)
    return {"steps": state.global_step, "seconds_per_step": budget_cb.seconds_per_step(state.global_step),
            "peak_rss_gib": round(peak.whole(), 2), "rows_per_generate": rows * members}


def plot(path: Path) -> Path:
    from curves import plot_against_seconds

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward" in r]
    return plot_against_seconds(path, rows, label=lambda r: f"{r['config']}, {r['host']['cpu_capability']} host",
                                before="reward_before", value="reward", ylabel="held-out mean reward (greedy)",
                                title="Gemma 3 270M, reward-es's task: ES (zotune) against GRPO (trl)")


def summary_line(row: dict) -> str:
    line = (f"{row['config']:<20} seed {row['seed']}  {row['steps']} steps  {row['seconds_per_step']} s/step  "
            f"peak {row['peak_rss_gib']} GiB (steps alone {row['train_peak_rss_gib']} GiB)")
    if "reward" in row:
        line += (f"  reward {row['reward_before']:.4f} -> {row['reward']:.4f}  forgetting acc "
                 f"{row['forgetting_accuracy_before']:.4f} -> {row['forgetting_accuracy_after']:.4f}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="es-lora,grpo-lora", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per run")
    parser.add_argument("--eval-every", type=float, default=150.0)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="held-out prompts: settings are chosen on validation, test is scored once")
    parser.add_argument("--out", type=Path, help="results file (default: benchmarks/results/reward_<split>.jsonl)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, int(args.seeds), args.budget, args.eval_every, args.eval_rows,
                                             args.split)))
        return
    args.out = args.out or RESULTS / f"reward_{args.split}.jsonl"
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for config in args.configs.split(","):
            arguments = ["--one", config, "--seeds", str(seed), "--budget", str(args.budget), "--eval-every",
                         str(args.eval_every), "--eval-rows", str(args.eval_rows), "--split", args.split]
            run_in_child(__file__, arguments, args.out, f"{config} seed {seed}", summary_line)
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    print_means([r for r in rows if r.get("reward") is not None],  # the generate reference trains nothing
                lambda r: r["config"], "reward")
    print(f"wrote {args.out} and {plot(args.out)}")


if __name__ == "__main__":
    main()
