"""momentum_update_: ZO-SGD with heavy-ball momentum, from a clean θ (no restore folded in)::

    buf = beta·buf + g·z
    θ   = θ·(1 − lr·wd) − lr·buf

θ is param, or the fp32 ``master`` when given (then param = round(master)). ``buf`` is
computed in float32 and stored in its own dtype; θ uses the float32 value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch, _fused
from zotune.kernels._dispatch import f32, store, tile, triton_jit
from zotune.kernels._philox import KIND_ID, noise_tile

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["momentum_update_"]


@triton_jit(do_not_specialize=["seed", "n", "offset"])
def _momentum_kernel(p_ptr, m_ptr, buf_ptr, seed, g, lr, decay, beta, n, offset, KIND: tl.constexpr,
                     HAS_MASTER: tl.constexpr, ROWS: tl.constexpr):
    rows, idx, mask = tile(n, offset, ROWS)
    z = noise_tile(seed, rows, KIND)
    buf = tl.load(buf_ptr + idx, mask=mask).to(tl.float32)
    buf = beta * buf + g * z
    store(buf_ptr + idx, buf, mask)
    if HAS_MASTER:
        theta = tl.load(m_ptr + idx, mask=mask)
    else:
        theta = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
    theta = theta * decay - lr * buf
    if HAS_MASTER:
        tl.store(m_ptr + idx, theta, mask=mask)
    store(p_ptr + idx, theta, mask)


def momentum_update_twin(param, buf, seed, g, lr, decay, beta, kind, offset, master=None, impl="eager",
                         directions=None):
    """The reference, on flat contiguous tensors; coefficients already rounded to float32."""
    _fused.run("momentum", momentum_update_math, {"param": param, "master": master, "buf": buf}, (seed,), kind,
               offset, (g, lr, decay, beta), impl, directions)


def momentum_update_math(zs, t, c):
    """One piece's float32 arithmetic (see `_fused`)."""
    (z,), (g, lr, decay, beta) = zs, c
    b = beta * t["buf"].float() + g * z
    theta = t["master"] if t["master"] is not None else t["param"].float()
    theta = theta * decay - lr * b
    out = {"buf": b, "param": theta}
    if t["master"] is not None:
        out["master"] = theta
    return out


@torch.no_grad()
def momentum_update_(param: torch.Tensor, buf: torch.Tensor, seed: int, g: float, lr: float, wd: float, beta: float,
                     *, kind: str, offset: int = 0, master: torch.Tensor | None = None,
                     directions=None) -> torch.Tensor:
    """In place: buf = beta·buf + g·z; θ = θ·(1 − lr·wd) − lr·buf, θ being param or ``master``
    (then param = round(master)). Returns param."""
    seed, offset = _dispatch.check(param, seed, kind, offset, master=master, buf=buf)
    g, lr32, decay, beta = f32(g), f32(lr), f32(1.0 - lr * wd), f32(beta)
    impl = _dispatch.choose(param.device, directions)
    with _dispatch.flat(param, master, buf) as (p, m, b):
        if impl == "triton":
            _dispatch.launch(_momentum_kernel, p.numel(), offset, p, p if m is None else m, b, seed, g, lr32, decay,
                             beta, KIND=KIND_ID[kind], HAS_MASTER=m is not None)
        else:
            momentum_update_twin(p, b, seed, g, lr32, decay, beta, kind, offset, master=m, impl=impl,
                                 directions=directions)
    return param
