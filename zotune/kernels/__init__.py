"""Triton kernels and their pure-PyTorch twins.

In-place passes over one parameter (or a shard: ``offset`` is the shard's first element in
the full tensor), each regenerating z = zotune.noise.noise(seed, numel, kind, offset) on the
fly. One file per op holds its Triton kernel, its PyTorch twin (the reference) and the
public function, which picks an implementation with `_dispatch.choose`:

- `perturb_`                  param += scale·z; with ``out``: out = θ + scale·z, θ untouched
- `perturb_rows`              a new tensor of some rows of θ + scale·z (an Embedding's lookups)
- `restore_and_update_`       fused schedule: restore from θ − εz and apply ZO-SGD
- `move_perturbation_`        in-place schedules: from θ + a·z_prev to θ + b·z_next in one pass
- `momentum_update_`          ZO-SGD with momentum
- `adam_update_`              AdamW on ĝ = g·z

Every op takes float32, bfloat16 or float16 params, an optional float32 ``master`` copy of
θ for 16-bit params, any shape (non-contiguous ones are worked on as a contiguous copy) and
``kind`` "gaussian", "gaussian4x" or "rademacher". An optional ``directions`` (seed -> the whole tensor's z)
replaces the noise for structured perturbations (masked, preconditioned, low-rank; see
zotune.methods); the op then runs its eager twin on z = directions(seed). Importing this package does not import triton.

Out of place (DESIGN §3, "θ never moves except by its update"): ``perturb_(..., out=)`` writes
θ + c·z into a scratch tensor (any of the three dtypes) and leaves θ where its updates put it; a
chunk of rows is a contiguous slice of rows of param and out with offset + row0·row_numel.
`perturb_rows` gathers rows (noise at the gathered global indices, `zotune.noise.noise_at`).

Stochastic rounding: ``restore_and_update_`` takes ``rounding_seed`` for bfloat16/float16 params
without a master: what it stores into param is rounded stochastically (unbiased) with bits from
Philox(rounding_seed) at the element's global index, the same integers in every implementation
(see `_rounding`).

Numerics: every implementation does the same float32 operations in the same order, each
rounded (no fused multiply-add), with scalar coefficients computed in double on the host and
rounded to float32 once. So rademacher results are bit-equal across implementations; with
gaussian noise they differ only through z's last bits (log/cos differ between libraries).
"""

from zotune.kernels.adam import adam_update_
from zotune.kernels.momentum import momentum_update_
from zotune.kernels.move_perturbation import move_perturbation_
from zotune.kernels.perturb import perturb_
from zotune.kernels.perturb_rows import perturb_rows
from zotune.kernels.restore_and_update import restore_and_update_

__all__ = ["perturb_", "perturb_rows", "restore_and_update_", "move_perturbation_", "momentum_update_",
           "adam_update_"]
