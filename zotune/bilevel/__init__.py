"""ScaleBiO mode (`method: scalebio`): learn mixture weights over data sources (DESIGN §6).

- `zotune.bilevel.data`: the sources (slices, label noise), stratified batches, per-sample losses,
  the resampled mixture;
- `zotune.bilevel.sets`: w and u as two adapters, two parameter sets or two model copies; LISA;
- `zotune.bilevel.loop`: the three-variable update, checkpoints, logs and outputs.
"""

from zotune.bilevel.loop import ScaleBiO, lambda_gradient, run_scalebio

__all__ = ["ScaleBiO", "lambda_gradient", "run_scalebio"]
