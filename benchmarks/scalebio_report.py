"""Collect the figures of the ScaleBiO demonstration into benchmarks/results/scalebio.txt.

Run from benchmarks/ after the runs it reads (their commands are in the results file):

    python scalebio_report.py ../runs/scalebio-fo ../runs/scalebio-zo

For each ScaleBiO run it prints the final weights, the ranking, whether the ranking follows the
label noise, and the total weight on the fully corrupted sources against half their uniform
share; it copies each run's plot to results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def noise_of(run: Path) -> dict[str, float]:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    return {s["name"]: s.get("label_noise", 0.0) for s in recipe["bilevel"]["sources"]}


def describe(run: Path) -> list[str]:
    final = json.loads((run / "mixture_weights_final.json").read_text())
    p, noise = final["weights"], noise_of(run)
    k = len(p)
    levels = sorted(set(noise.values()))
    ordered = all(min(p[n] for n in p if noise[n] == a) > max(p[n] for n in p if noise[n] == b)
                  for a, b in zip(levels, levels[1:]))
    corrupted = [n for n in p if noise[n] == 1.0]
    mass, half = sum(p[n] for n in corrupted), 0.5 * len(corrupted) / k
    lines = [f"## {run.name}: gradient {final['gradient']}, w/u as {final['copies']}, {final['step']} steps"]
    lines += [f"  {n:12s} label_noise {noise[n]:.2f}  p = {p[n]:.4f}" for n in sorted(p, key=lambda n: -p[n])]
    lines.append(f"  ranking follows the label noise (every cleaner level above every noisier one): {ordered}")
    lines.append(f"  clean source on top: {noise[final['ranking'][0]] == 0.0}")
    lines.append(f"  weight on fully corrupted sources: {mass:.4f} (uniform share {2 * half:.4f}, half of it "
                 f"{half:.4f}): {'below' if mass < half else 'NOT below'} half")
    plot = run / "mixture_weights.png"
    if plot.is_file():
        target = HERE / "results" / f"scalebio_{run.name.removeprefix('scalebio-')}.png"
        shutil.copy(plot, target)
        lines.append(f"  plot: benchmarks/results/{target.name}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    lines = []
    for run in args.runs:
        lines += describe(run) + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
