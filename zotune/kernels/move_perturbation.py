"""move_perturbation_: the in-place schedules' pass from one displacement to the next, generating
both z streams in registers::

    param = (param + prev_coef·z_prev) + next_scale·z_next

A param at θ + a·z_prev goes to θ + b·z_next with prev_coef = −a, next_scale = b: the fused
schedule's restore and next perturbation in one pass over the weights instead of two. The sum is
taken in float32 in that order and rounded once to param's dtype (an ulp from two `perturb_`
passes, so replay must take the same op).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused
from zotune.kernels._dispatch import f32, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["move_perturbation_"]


@triton_jit(do_not_specialize=["prev_seed", "next_seed", "n", "offset"])
def _move_kernel(p_ptr, prev_seed, prev_coef, next_seed, next_scale, n, offset, KIND: tl.constexpr,
                 ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z_prev = noise_tile(prev_seed, rows, KIND)
    z_next = noise_tile(next_seed, rows, KIND)
    theta = tl.load(p_ptr + idx, mask=mask).to(tl.float32) + prev_coef * z_prev
    store(p_ptr + idx, theta + next_scale * z_next, mask)


def move_perturbation_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z_prev, z_next), (prev_coef, next_scale) = zs, c
    return {"param": (t["param"].float() + prev_coef * z_prev) + next_scale * z_next}


def move_perturbation_twin(param, prev_seed, prev_coef, next_seed, next_scale, kind, offset, impl="eager",
                           directions=None):
    """The reference, on flat contiguous tensors; coefficients already rounded to float32."""
    _fused.run("move_perturbation", move_perturbation_math, {"param": param}, (prev_seed, next_seed), kind, offset,
               (prev_coef, next_scale), impl, directions)


@torch.no_grad()
def move_perturbation_(param: torch.Tensor, prev_seed: int, prev_coef: float, next_seed: int, next_scale: float,
                       *, kind: str, offset: int = 0, directions=None) -> torch.Tensor:
    """In place: param = param + prev_coef·z(prev_seed) + next_scale·z(next_seed), summed in float32
    in that order and rounded once to param's dtype. Returns param."""
    prev_seed, offset = _dispatch.check(param, prev_seed, kind, offset)
    next_seed, _ = _dispatch.check(param, next_seed, kind, offset)
    prev_coef, next_scale = f32(prev_coef), f32(next_scale)
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param) as (p,):
        if impl == "triton":
            _dispatch.launch(_move_kernel, p.numel(), offset, p, prev_seed, prev_coef, next_seed, next_scale,
                             KIND=KIND_ID[kind])
        else:
            move_perturbation_twin(p, prev_seed, prev_coef, next_seed, next_scale, kind, offset, impl=impl,
                                   directions=directions)
    return param
