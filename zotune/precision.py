"""Which trainable weights keep an fp32 master copy: the one definition of `zo.master_weights`.

- ``auto`` (default): a master copy only where a 16-bit weight is displaced in place (the
  ``sequential`` and ``fused`` schedules, MeZO's way), or where the update rule has no
  stochastically rounded 16-bit update. The out-of-place ``dual`` schedule never displaces θ,
  so its 16-bit weights need none: their updates are stochastically rounded instead.
- ``fp32``: a master copy beside every 16-bit trainable weight (4 more bytes per 2).
- ``none``: no master copy. With an in-place schedule, 16-bit weights then drift by the
  rounding of +εz, −2εz, +εz every step (MeZO's behaviour without one); that is allowed with a
  warning. A rule without a stochastically rounded update refuses it on 16-bit weights.

fp32 weights never have a master copy.
"""

from __future__ import annotations

MASTER_WEIGHTS = ("auto", "fp32", "none")
IN_PLACE_SCHEDULES = ("sequential", "fused")
SCHEDULES = ("dual", *IN_PLACE_SCHEDULES)  # every ZO schedule; dual perturbs out of place
HALF_DTYPES = ("float16", "bfloat16")  # torch dtypes by name: validating a recipe does not import torch

DRIFT_WARNING = ("master_weights none with the in-place {schedule} schedule: "
                 "16-bit weights are moved by +εz, −2εz, +εz "
                 "in place and drift by their rounding every step (MeZO's behaviour without a master copy); the "
                 "out-of-place dual schedule does not")


def is_half(dtype) -> bool:
    """Whether `dtype` (a torch dtype or its name) is a 16-bit float."""
    return str(dtype).removeprefix("torch.") in HALF_DTYPES


def keeps_master(setting: str, schedule: str, dtype, rounds_stochastically: bool) -> bool:
    """Whether a trainable weight of `dtype` keeps an fp32 master copy under `setting`."""
    if setting not in MASTER_WEIGHTS:
        raise ValueError(f"unknown master_weights {setting!r}; choose one of {', '.join(MASTER_WEIGHTS)}")
    if not is_half(dtype) or setting == "none":
        return False
    if setting == "fp32":
        return True
    return schedule in IN_PLACE_SCHEDULES or not rounds_stochastically


def refusal(setting: str, dtype, rule_name: str, rounds_stochastically: bool) -> str | None:
    """Why `setting` cannot train weights of `dtype` with this rule, or None."""
    if setting == "none" and is_half(dtype) and not rounds_stochastically:
        return (f"master_weights none: rule {rule_name!r} has no stochastically rounded 16-bit update; use "
                "master_weights auto or fp32")
    return None
