"""Accuracy against wall-clock and against steps, and peak memory, for a table of configurations.

    python benchmarks/quality.py --data rotten_tomatoes --configs zo-sgd,fzoo,fo-lora --split validation
    python benchmarks/quality.py --data bbc_news --split test --seeds 0,1,2 --configs <the chosen ones>
    python benchmarks/quality.py --plot benchmarks/results/quality_rotten_tomatoes_validation.jsonl

Protocol (fixed before the runs):
- Gemma 3 270M (the quickstart's model), data from ../shared/data: rotten_tomatoes (2 classes,
  the quickstart's prompt and label words) and bbc_news (5 classes, the title as the prompt).
  Class-balanced batches; a constant learning rate (every configuration stops on a time budget,
  not a step count, so no schedule is tied to a length).
- Every configuration trains for the same wall-clock budget, `--budget` seconds of training steps
  (evaluations are not counted): by default the 246 s that `zotune train quickstart-fo` trains
  for (README, "What is measured"). The accuracy is taken every `--eval-every` seconds of training.
- Settings (learning rate, eps, directions) are chosen on the validation split (`--split
  validation`: its first 400 rows). The test split is scored once, at the end, with the chosen
  settings and three seeds (`--split test --seeds 0,1,2`).
- `--steps N` trains every configuration for exactly N steps instead: quality per step, which does not
  depend on what else runs on the machine (its rows are labelled with the step count).
- Each run is its own process, so its peak RSS is its own.

Each run appends one JSON line to benchmarks/results/quality_<data>_<split>.jsonl: the configuration,
seed, accuracy before, the (training seconds, step, accuracy) points, steps, seconds per step and
peak RSS. `--plot FILE` draws accuracy against training seconds, one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from budgeted import Budget, add_run_arguments, print_means, run_in_child

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
FO_QUICKSTART_SECONDS = 246  # quickstart-fo's training time (4.1 min, README "What is measured")

# dataset -> recipe overrides that point the quickstart recipes at it
DATASETS = {
    "rotten_tomatoes": [],
    "bbc_news": [
        f"data.train.path={DATA}/bbc_news/train.jsonl",
        "data.eval.split=validation",
        "data.template='{title}. Topic:'",
        'data.verbalizer={business: " business", entertainment: " entertainment", politics: " politics", '
        'sports: " sports", tech: " tech"}',
        "data.max_length=48",
        "train.per_device_train_batch_size=15",
    ],
}

# pure ZO-SGD, the quickstart's (and from 2026-12-03 to 12-06, while it ran Addax, its override): kept explicit
ZO_SGD = ["zo.rule=sgd", "train.learning_rate=3e-4"]

# every weight trained, with MeZO's full-parameter settings (Malladi et al. 2023, arXiv:2305.17333: eps 1e-3,
# learning rate 1e-6 or 1e-7 for OPT); not tuned here
FULL = ["model.peft=null", "zo.eps=1e-3", "train.learning_rate=1e-6"]
GUIDED = "zo.estimator={name: guided, history: 8, alpha: 0.5}"  # guided ES, settings chosen on LoRA's validation
FZOOS = "zo.estimator={name: fzoos, features: 32, history: 8, lengthscale: 10}"

# Addax's hybrid as the quickstart shipped it from 2026-12-03 to 2026-12-06 (its alpha set by each configuration)
ADDAX = ["zo.rule={name: addax, max_tokens: 64}", "train.learning_rate=1e-2"]

# name -> (shipped recipe, overrides): each a path a user can take with `zotune train`
CONFIGS = {
    "zero-shot": ("quickstart", []),  # evaluated, not trained
    "zo-sgd": ("quickstart", ZO_SGD),
    "zo-sgd-rademacher": ("quickstart", [*ZO_SGD, "zo.perturbation=rademacher"]),
    "zo-momentum": ("quickstart", [*ZO_SGD, "zo.rule=momentum"]),
    "zo-guided": ("quickstart", [*ZO_SGD, GUIDED]),
    "zo-fzoos": ("quickstart", [*ZO_SGD, FZOOS]),
    "zo-sliced": ("quickstart", [*ZO_SGD, "zo.num_directions=4", "zo.slice_directions=true"]),  # MobiZO's split
    "fzoo": ("quickstart", ["zo.rule=fzoo", "zo.estimator=onesided", "zo.num_directions=4",
                            "zo.perturbation=rademacher", "zo.schedule=fused", "train.learning_rate=2e-5"]),
    # Addax: backprop on each batch's shortest rows within 64 tokens, ZO on the rest; the ZO part is weighted by
    # alpha so that alpha * lr stays near ZO-SGD's stable step
    "zo-addax": ("quickstart", [*ADDAX, "zo.rule.alpha=0.05"]),
    # its control: the same step with the ZO estimate weighted 0, so the update is the backprop rows' alone (the
    # ZO forwards still run: equal time buys equal steps, and any gain of zo-addax over it is the ZO part's)
    "zo-addax-alpha0": ("quickstart", [*ADDAX, "zo.rule.alpha=0"]),
    "zo-prefix": ("prefix-tuning", []),
    "zo-full": ("quickstart", [*ZO_SGD, *FULL]),
    "zo-guided-full": ("quickstart", [*ZO_SGD, GUIDED, *FULL]),
    "zo-fzoos-full": ("quickstart", [*ZO_SGD, FZOOS, *FULL]),
    "zo-full-bf16": ("quickstart", [*ZO_SGD, *FULL, "model.dtype=bfloat16"]),
    "fo-lora": ("quickstart-fo", []),
    "fo-lora-ckpt": ("quickstart-fo", ["train.activation_checkpointing=true"]),
    "fo-qlora": ("quickstart-fo", ["model.quantization={bits: 4, quant_type: nf4, compute_dtype: float32}"]),
    "fo-full": ("quickstart-fo", ["model.peft=null", "train.learning_rate=1e-5"]),
}


def eval_path(data: str, split: str) -> str:
    return f"data.eval.path={DATA}/{data}/{split}.jsonl"


def run_one(config: str, data: str, split: str, seed: int, budget: float, every: float, extra: list[str],
            steps: int | None = None) -> dict:
    """One configuration in this process: train for `budget` seconds of steps (or exactly `steps` steps),
    evaluating every `every` seconds and at the end."""
    from transformers import TrainerCallback

    from zotune.recipe import load_recipe
    from zotune.run import build_model, build_trainer

    recipe_name, overrides = CONFIGS[config]
    out = Path("/tmp") / f"zotune-quality-{data}-{split}-{config}-{seed}-{time.time_ns()}"
    recipe = load_recipe(recipe_name, [*DATASETS[data], eval_path(data, split), *overrides,
                                       "data.eval.max_samples=400", f"train.seed={seed}", "train.max_steps=100000",
                                       "train.lr_scheduler_type=constant", "train.save_strategy=no",
                                       f"train.output_dir={out}", *extra])

    class Evaluations(TrainerCallback):
        def __init__(self):
            self.points = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.points.append({"seconds": round(budget_cb.spent, 1), "step": state.global_step,
                                "accuracy": metrics.get("eval_accuracy")})

    import host

    model, tokenizer = build_model(recipe)
    trainer, metric = build_trainer(recipe, model, tokenizer)
    before = trainer.evaluate()[metric]
    budget_cb, evaluations = Budget(budget, every, lambda state, control: setattr(control, "should_evaluate", True),
                                    steps), Evaluations()
    trainer.add_callback(budget_cb)
    trainer.add_callback(evaluations)
    if config != "zero-shot":
        trainer.train()
    trained = trainer.state.global_step
    return {"config": config, "data": data, "split": split, "seed": seed, "budget_s": None if steps else budget,
            "accuracy_before": before, "points": evaluations.points,
            "accuracy": evaluations.points[-1]["accuracy"] if evaluations.points else before, "steps": trained,
            "seconds_per_step": budget_cb.seconds_per_step(trained),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "overrides": [*DATASETS[data], *overrides, *extra], "extra": extra, "host": host.describe()}


def describe(row: dict) -> str:
    return (f"{row['config']:<20} seed {row['seed']}  {row['accuracy_before']:.4f} -> {row['accuracy']:.4f}  "
            f"{row['steps']} steps  {row['seconds_per_step']} s/step  peak {row['peak_rss_gib']} GiB")


def label_of(row: dict) -> str:
    """A configuration and the overrides given to it with --set (and its step count, when --steps fixed it)."""
    fixed = [f"{row['steps']} steps"] if "budget_s" in row and row["budget_s"] is None else []
    return " ".join([row["config"], *row.get("extra", []), *fixed])


def plot(path: Path) -> Path:
    from curves import plot_against_seconds

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return plot_against_seconds(path, rows, label=label_of, before="accuracy_before", value="accuracy",
                                ylabel=f"accuracy ({rows[0]['split']}, first 400 rows)",
                                title=f"Gemma 3 270M on {rows[0]['data']}: accuracy against wall-clock")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="rotten_tomatoes")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--budget", type=float, default=FO_QUICKSTART_SECONDS, help="training seconds per run")
    parser.add_argument("--steps", type=int, help="train exactly this many steps instead of --budget seconds: "
                        "compares quality per step, whatever else runs on the machine")
    parser.add_argument("--eval-every", type=float, default=60.0)
    parser.add_argument("--set", action="append", default=[], help="one more recipe override for every run")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    if args.one:
        row = run_one(args.one, args.data, args.split, int(args.seeds), args.budget, args.eval_every, args.set,
                      args.steps)
        print("RESULT " + json.dumps(row))
        return
    out = RESULTS / f"quality_{args.data}_{args.split}.jsonl"
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for config in args.configs.split(","):
            arguments = ["--one", config, "--data", args.data, "--split", args.split, "--seeds", str(seed),
                         "--budget", str(args.budget), "--eval-every", str(args.eval_every),
                         *(["--steps", str(args.steps)] if args.steps else []), *(f"--set={s}" for s in args.set)]
            run_in_child(__file__, arguments, out, f"{config} seed {seed}", describe)
    print_means([json.loads(line) for line in out.read_text().splitlines()], label_of, "accuracy")
    print(f"wrote {out} and {plot(out)}")


if __name__ == "__main__":
    main()
