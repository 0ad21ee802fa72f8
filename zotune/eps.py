"""Sanity of `zo.eps`, the perturbation scale ε: the one definition of what an ε too large is.

The ± forwards see θ ± ε·z with z of unit RMS, so ε·z has RMS ε. MeZO (Malladi et al. 2023,
"Fine-Tuning Language Models with Just Forward Passes", arXiv:2305.17333) uses ε = 1e-3 for
every model and task; zotune's default is the same. Three checks, from the cheapest:

- **at validation** (no weights yet): ε < `MAX_EPS` = 1. No usual initialisation or trained
  model has a trainable tensor of RMS above about 1 (norm gains start at 1, embeddings at
  N(0, 1) or less, matrices at about 0.02 or 1/√fan_in), so ε ≥ 1 perturbs every weight by more
  than its own size.
- **at train start** (weights loaded): ε against the RMS of all trainable parameters together
  (`trainable_rms`); ε above `SWAMP_RATIO` times it (`swamp_error`) means θ ± ε·z is mostly
  noise, and training is refused. The ratio is 10, not 1: a large ε is a legitimate choice for
  objectives that only change when a prediction flips (training on accuracy learns at ε ≈ 2.5×
  the RMS of a tiny model's weights, `tests/test_objectives.py`). Zero-initialised trainables (LoRA's B)
  count with their zeros; when everything is zero there is no scale to compare with and nothing is refused.
- **at the first step of an in-place schedule** (sequential, fused): the weights themselves go
  θ → θ+εz → θ−εz → θ, and float arithmetic does not bring them back exactly (in 16 bits without
  an fp32 master, or in any dtype once ε·z dwarfs θ). `ZOOptimizer` measures the relative change
  that round trip leaves in one sampled tensor and warns above `ROUND_TRIP_TOLERANCE`
  (`round_trip_warning`). Out of place (dual) θ never moves; a huge ε there makes both perturbed
  forwards degenerate (a tiny Llama's logits go constant: L+ = L− = ln V, g = 0), which the
  train-start check refuses before it happens.
"""

from __future__ import annotations

import math

MAX_EPS = 1.0
SWAMP_RATIO = 10.0  # refused when ε > SWAMP_RATIO · RMS(trainable θ)
ROUND_TRIP_TOLERANCE = 0.01  # warned when the in-place round trip changes a weight by more (relative L2)
ROUND_TRIP_SAMPLE = 1 << 16  # the round trip is measured on at most this many elements of one tensor


def bound_error(eps: float) -> str | None:
    """Why `eps` is refused before any weight is loaded, or None."""
    if eps >= MAX_EPS:
        return (f"eps {eps:g} perturbs every weight by more than its own size (ε·z has RMS ε; usual weights have RMS "
                f"well below {MAX_EPS:g}); use an eps below {MAX_EPS:g}, such as MeZO's 1e-3")
    return None


def trainable_rms(params) -> float:
    """The root mean square of all elements of `params` (tensors of any float dtype), in float64."""
    import torch

    total, count = 0.0, 0
    for p in params:
        total += torch.linalg.vector_norm(p.detach(), dtype=torch.float32).double().item() ** 2
        count += p.numel()
    return math.sqrt(total / count) if count else 0.0


def swamp_error(eps: float, rms: float, key: str) -> str | None:
    """Why `eps` is refused against trainable weights of RMS `rms`, naming the setting `key`, or None."""
    if rms > 0 and eps > SWAMP_RATIO * rms:
        return (f"{key} = {eps:g} is {eps / rms:.3g}x the RMS of the trainable weights ({rms:.3g}): θ ± ε·z would be "
                f"mostly noise (an in-place schedule can destroy the weights in its round trip; refused above "
                f"{SWAMP_RATIO:g}x); use an eps below {rms:.3g}, such as 1e-3 (MeZO's)")
    return None


def round_trip_warning(eps: float, change: float, name: str, schedule: str) -> str | None:
    """The warning for an in-place round trip that left relative change `change` in parameter `name`, or None."""
    if change <= ROUND_TRIP_TOLERANCE:
        return None
    return (f"eps {eps:g}: the in-place {schedule} round trip θ → θ+εz → θ−εz → θ changes {name} by {change:.3g} "
            f"(relative L2, above {ROUND_TRIP_TOLERANCE:g}) every step, besides the update; lower eps, keep fp32 "
            "masters (master_weights fp32) or use the dual schedule, which never moves θ")
