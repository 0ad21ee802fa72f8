"""restore_and_update_: the fused schedule's single pass that restores θ and applies ZO-SGD.

The param sits at θ − εz. In one pass (one regeneration of z)::

    θ = param + ε·z
    param = θ·(1 − lr·wd) − lr·g·z

With an fp32 ``master`` (which holds θ itself, not the perturbed value) the restore is
exact: master = master·(1 − lr·wd) − lr·g·z, param = round(master).

With ``rounding_seed`` (a 16-bit param without a master) the new value is stored into param
rounded stochastically (`_rounding`), so updates below half an ulp survive in expectation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused, _rounding
from zotune.kernels._dispatch import f32, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile
from zotune.kernels._rounding import store_stochastic

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["restore_and_update_"]


@triton_jit(do_not_specialize=["seed", "rounding_seed", "n", "offset"])
def _restore_and_update_kernel(p_ptr, m_ptr, seed, eps, decay, coef, rounding_seed, n, offset, KIND: tl.constexpr,
                               HAS_MASTER: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z = noise_tile(seed, rows, KIND)
    if HAS_MASTER:
        theta = tl.load(m_ptr + idx, mask=mask)
    else:
        theta = tl.load(p_ptr + idx, mask=mask).to(tl.float32) + eps * z
    theta = theta * decay - coef * z
    if HAS_MASTER:
        tl.store(m_ptr + idx, theta, mask=mask)
    if ROUND:
        store_stochastic(p_ptr + idx, theta, tl.randint(rounding_seed, offset.to(tl.int64) + idx), mask)
    else:
        store(p_ptr + idx, theta, mask)


def restore_and_update_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z,), (eps, decay, coef) = zs, c
    if t["master"] is None:
        theta = t["param"].float() + eps * z
    else:
        theta = t["master"]
    theta = theta * decay - coef * z
    return {"param": _rounding.to_param(theta, t)} if t["master"] is None else {"master": theta, "param": theta}


def restore_and_update_twin(param, seed, eps, decay, coef, kind, offset, master=None, impl="eager", directions=None,
                            rounding_seed=None):
    """The reference, on flat contiguous tensors; coefficients already rounded to float32
    (decay = 1 − lr·wd, coef = lr·g)."""
    _fused.run("restore_and_update", restore_and_update_math, {"param": param, "master": master}, (seed,), kind,
               offset, (eps, decay, coef), impl, directions, rounding_seed)


@torch.no_grad()
def restore_and_update_(param: torch.Tensor, seed: int, eps: float, g: float, lr: float, wd: float, *, kind: str,
                        offset: int = 0, master: torch.Tensor | None = None, directions=None,
                        rounding_seed: int | None = None) -> torch.Tensor:
    """In place: param (at θ − εz) becomes (θ)·(1 − lr·wd) − lr·g·z; with ``master`` (holding θ),
    master gets that value and param = round(master). Returns param.

    ``rounding_seed``: store into a bfloat16/float16 param (no master) with stochastic rounding
    driven by Philox(rounding_seed) at the element's global index (`_rounding`); ValueError for a
    float32 param or with a master."""
    seed, offset = _dispatch.check(param, seed, kind, offset, master=master)
    rounding_seed = _rounding.check(param, master, rounding_seed)
    eps, decay, coef = f32(eps), f32(1.0 - lr * wd), f32(lr * g)
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master) as (p, m):
        if impl == "triton":
            _dispatch.launch(_restore_and_update_kernel, p.numel(), offset, p, p if m is None else m, seed, eps, decay,
                             coef, rounding_seed or 0, KIND=KIND_ID[kind], HAS_MASTER=m is not None,
                             ROUND=rounding_seed is not None)
        else:
            restore_and_update_twin(p, seed, eps, decay, coef, kind, offset, master=m, impl=impl, directions=directions,
                                    rounding_seed=rounding_seed)
    return param
