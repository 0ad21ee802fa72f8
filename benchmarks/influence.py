"""Finding mislabelled rows by ZO self-influence, and explaining predictions, on real data.

    python benchmarks/influence.py            # Gemma 3 270M + LoRA, rotten_tomatoes, ~25 min on 2 CPU cores

1. The first `--rows` rows of ../shared/data/rotten_tomatoes/train.jsonl, `--noise` of their labels
   flipped (seeded), are written to a scratch folder with the list of flipped rows.
2. `zotune train quickstart zo.rule=sgd` trains on them by ZO-SGD (the quickstart's model and data
   settings, `--steps` steps; attribution needs a pure ZO-SGD run, not the quickstart's Addax).
3. `zotune influence RUN --self --first-order --noisy ...` ranks the rows by ZO self-influence and
   by first-order TracInCP through autograd on the same checkpoints: the flipped rows' recall in the
   top 20% of each ranking (random: 0.2), and the wall-clock of each.
4. `zotune influence RUN --test ...` on the first `--test-rows` test rows: each one's top proponents
   and opponents among the training rows.

Prints the figures and writes them, with the commands, to benchmarks/results/influence_rotten_tomatoes.txt
(and the recall curves to influence_rotten_tomatoes.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import host

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"
RESULTS = ROOT / "benchmarks" / "results"
ZOTUNE = [sys.executable, "-m", "zotune.cli"]


def run(command: list[str], log: list[str]) -> float:
    """Run a zotune command, recording it; returns its wall-clock seconds."""
    log.append(" ".join(command[2:]).replace("zotune.cli", "zotune"))
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3, help="ZO-SGD's (chosen on validation, docs/benchmarks.md)")
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--test-rows", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zotune-influence-"))
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()[:args.rows]]
    rng = np.random.default_rng(args.seed)
    flipped = sorted(rng.permutation(len(rows))[:round(args.noise * len(rows))].tolist())
    for i in flipped:
        rows[i]["label"] = 1 - rows[i]["label"]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "noisy.json").write_text(json.dumps(flipped))
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:args.test_rows]]
    (work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    out, log = work / "run", []

    seconds = {"train": run([*ZOTUNE, "train", "quickstart", "zo.rule=sgd", f"train.learning_rate={args.lr}",
                             f"data.train.path={work}/train.jsonl",
                             f"data.eval.path={DATA}/validation.jsonl", "data.eval.max_samples=100",
                             f"train.max_steps={args.steps}", f"train.output_dir={out}"], log)}
    seconds["self-influence (ZO and first order)"] = run(
        [*ZOTUNE, "influence", str(out), "--self", "--first-order", "--noisy", str(work / "noisy.json"),
         "--directions", str(args.directions), "--checkpoints", str(args.checkpoints)], log)
    seconds["attribution"] = run([*ZOTUNE, "influence", str(out), "--test", str(work / "test.jsonl")], log)

    summary = json.loads((out / "influence" / "self_influence_summary.json").read_text())
    lines = [f"$ {command}" for command in log]
    lines += ["", f"{args.rows} training rows of rotten_tomatoes, {len(flipped)} labels flipped (seed {args.seed}); "
              f"ZO-SGD (lr {args.lr}) for {args.steps} steps",
              f"flipped rows' recall in the top 20%: ZO self-influence {summary['recall_top_20pct']:.3f} "
              f"({args.directions} directions x {args.checkpoints} checkpoints, {summary['seconds_zo']} s), "
              f"first-order TracInCP {summary['recall_top_20pct_first_order']:.3f} "
              f"({summary['seconds_first_order']} s); random 0.2",
              f"Spearman correlation of the two rankings: {summary['spearman_zo_vs_first_order']:.3f}", ""]
    for row in map(json.loads, (out / "influence" / "attribution.jsonl").read_text().splitlines()):
        text = test[row["test_index"]]["text"]
        lines.append(f"test row {row['test_index']} (label {test[row['test_index']]['label']}): {text[:90]!r}")
        lines.append(f"  loss {row['loss_before']:.3f} -> {row['loss_after']:.3f} (measured "
                     f"{row['measured_change']:+.4f}, attributed {row['attributed_change']:+.4f})")
        for kind in ("proponents", "opponents"):
            for item in row[kind][:3]:
                source = rows[item["train_index"]]
                mark = " [flipped]" if item["train_index"] in flipped else ""
                lines.append(f"  {kind[:-1]:<9} {item['contribution']:+.5f}  train {item['train_index']} "
                             f"(label {source['label']}{mark}): {source['text'][:70]!r}")
    lines += ["", "wall-clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "influence_rotten_tomatoes.txt").write_text("\n".join([host.line(), *lines]) + "\n")
    shutil.copy(out / "influence" / "self_influence.png", RESULTS / "influence_rotten_tomatoes.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
