"""What quality.py and reward.py share: training for a wall-clock budget, each run in its own process,
and the mean ± spread over seeds."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback


class Budget(TrainerCallback):
    """Counts the seconds of training steps (what runs between them, evaluations included, is left out).
    Every `every` of those seconds and at the stop it calls `mark(state, control)`; it stops the run after
    `budget` seconds, or after `steps` steps when given."""

    def __init__(self, budget: float, every: float, mark: Callable, steps: int | None = None):
        self.budget, self.every, self.mark, self.steps = budget, every, mark, steps
        self.spent, self.next_mark, self.started = 0.0, every, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.spent += time.perf_counter() - self.started
        done = state.global_step >= self.steps if self.steps else self.spent >= self.budget
        if self.spent >= self.next_mark or done:
            self.mark(state, control)
            self.next_mark += self.every
        if done:
            control.should_training_stop = True

    def seconds_per_step(self, steps: int) -> float | None:
        return round(self.spent / steps, 3) if steps else None


def add_run_arguments(parser) -> None:
    """The options every budgeted benchmark takes besides its own: --one (internal: run one configuration in
    this process, the child `run_in_child` starts) and --plot."""
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, help="draw a results file and exit")


def run_in_child(script: str, arguments: list[str], out: Path, what: str, describe: Callable[[dict], str]) -> None:
    """`python SCRIPT --one ... ARGUMENTS` in a process of its own (its peak memory is its own); the row it
    prints after "RESULT " is appended to `out` and described on stdout. A failure is said and skipped."""
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True,
                          cwd=Path(script).resolve().parents[1])
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not result:
        print(f"{what}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return
    row = json.loads(result[-1].removeprefix("RESULT "))
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(describe(row), flush=True)


def print_means(rows: list[dict], label: Callable[[dict], str], value: str) -> None:
    """Each label's mean `value` over its rows, with the standard deviation over seeds when there are several."""
    for name in dict.fromkeys(map(label, rows)):
        values = [r[value] for r in rows if label(r) == name]
        spread = f" ± {statistics.stdev(values):.4f} (n={len(values)})" if len(values) > 1 else ""
        print(f"  {name:<40} {statistics.fmean(values):.4f}{spread}")
