"""perturb_: param += scale * z, or out of place: out = θ + scale * z with θ untouched.

With an fp32 ``master`` (16-bit param): param = round(master + scale * z), master unchanged,
so a perturbation never accumulates rounding error in the 16-bit copy.

With ``out`` (DESIGN §3, "θ never moves except by its update"): param and master are only read,
and out = round_to_out's_dtype(θ + scale * z), θ = master if given, else param in float32. A
range of rows is the caller's contiguous slice of rows of param (and master) and of out, with
``offset`` = the tensor's offset + row0 * row_numel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused
from zotune.kernels._dispatch import f32, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["perturb_"]


@triton_jit(do_not_specialize=["seed", "n", "offset"])
def _perturb_kernel(p_ptr, m_ptr, o_ptr, seed, scale, n, offset, KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
                    HAS_OUT: tl.constexpr, ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z = noise_tile(seed, rows, KIND)
    if HAS_MASTER:
        x = tl.load(m_ptr + idx, mask=mask)
    else:
        x = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    if HAS_OUT:
        store(o_ptr + idx, x + scale * z, mask)
    else:
        store(p_ptr + idx, x + scale * z, mask)


def perturb_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z,), (scale,) = zs, c
    x = t["master"] if t["master"] is not None else t["param"].float()
    # float32, then one rounding to the dtype of the tensor written
    return {"param" if t["out"] is None else "out": x + scale * z}


def perturb_twin(param, seed, scale, kind, offset, master=None, impl="eager", directions=None, out=None):
    """The reference, on flat contiguous tensors; ``scale`` already rounded to float32."""
    _fused.run("perturb", perturb_math, {"param": param, "master": master, "out": out}, (seed,), kind, offset, (scale,),
               impl, directions)


@torch.no_grad()
def perturb_(param: torch.Tensor, seed: int, scale: float, *, kind: str, offset: int = 0,
             master: torch.Tensor | None = None, directions=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """In place: param += scale * z, z = noise(seed, param.numel(), kind, offset) in param's
    row-major order; with ``master``: param = round(master + scale * z). Returns param.

    With ``out`` (param's shape and device, float32, bfloat16 or float16): param and master are
    left bit-unchanged and out = θ + scale * z rounded once to out's dtype, θ = master if given,
    else param. Returns out."""
    seed, offset = _dispatch.check(param, seed, kind, offset, master=master, **({} if out is None else {"out": out}))
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master, out) as (p, m, o):
        if impl == "triton":
            _dispatch.launch(_perturb_kernel, p.numel(), offset, p, p if m is None else m, p if o is None else o, seed,
                             f32(scale), KIND=KIND_ID[kind], HAS_MASTER=m is not None, HAS_OUT=o is not None)
        else:
            perturb_twin(p, seed, f32(scale), kind, offset, master=m, impl=impl, directions=directions, out=o)
    return param if out is None else out
