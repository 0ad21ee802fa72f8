"""perturb_: param += scale * z.

With an fp32 ``master`` (16-bit param): param = round(master + scale * z), master unchanged,
so a perturbation never accumulates rounding error in the 16-bit copy.
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
def _perturb_kernel(p_ptr, m_ptr, seed, scale, n, offset, KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
                    ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z = noise_tile(seed, rows, KIND)
    if HAS_MASTER:
        x = tl.load(m_ptr + idx, mask=mask)
    else:
        x = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    store(p_ptr + idx, x + scale * z, mask)


def perturb_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z,), (scale,) = zs, c
    x = t["master"] if t["master"] is not None else t["param"].float()
    return {"param": x + scale * z}  # float32, then one rounding to param's dtype


def perturb_twin(param, seed, scale, kind, offset, master=None, impl="eager", directions=None):
    """The reference, on flat contiguous tensors; ``scale`` already rounded to float32."""
    _fused.run("perturb", perturb_math, {"param": param, "master": master}, (seed,), kind, offset, (scale,), impl, directions)


@torch.no_grad()
def perturb_(param: torch.Tensor, seed: int, scale: float, *, kind: str, offset: int = 0,
             master: torch.Tensor | None = None, directions=None) -> torch.Tensor:
    """In place: param += scale * z, z = noise(seed, param.numel(), kind, offset) in param's
    row-major order; with ``master``: param = round(master + scale * z). Returns param."""
    seed, offset = _dispatch.check(param, seed, kind, offset, master=master)
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master) as (p, m):
        if impl == "triton":
            _dispatch.launch(_perturb_kernel, p.numel(), offset, p, p if m is None else m, seed, f32(scale),
                             KIND=KIND_ID[kind], HAS_MASTER=m is not None)
        else:
            perturb_twin(p, seed, f32(scale), kind, offset, master=m, impl=impl, directions=directions)
    return param
