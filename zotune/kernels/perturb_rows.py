"""perturb_rows: a perturbed copy of some rows of θ only (an nn.Embedding's looked-up rows).

    result[j] = round(θ[rows[j]] + scale·z[rows[j]])      shape (len(rows), *param.shape[1:])

z is the whole tensor's noise: element c of row r is noise element offset + r·row_numel + c of the
flattened full tensor (row_numel = elements per row), so the result equals
``perturb_(param.clone(), ...)[rows]`` (bit for bit with rademacher noise; with gaussian, the usual
last-bit differences between implementations). θ is read only; the result has param's dtype,
rounded once from float32. ``rows`` is any int64 1-D tensor of row indices, in any order, with
repeats (an embedding's lookups); they are checked to lie in [0, param.shape[0]).

Implementations: the Triton kernel gathers a block of (rows × columns) per program, generating z
at the gathered global indices (gaussian ``tl.randn(seed, i)``; gaussian4x output i & 3 of
``tl.randn4x(seed, i >> 2)``; rademacher one ``tl.randint4x``
at counter i >> 7 per element, taking bit i & 31 of word (i >> 5) & 3). The PyTorch twin uses
`zotune.noise.noise_at`, and "compiled" runs that eager twin too: a gather of arbitrary rows has
no fixed-size piece to compile once, and only the looked-up rows are generated anyway.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from zotune.kernels import _dispatch
from zotune.kernels._dispatch import f32, store, triton_jit
from zotune.kernels._philox import KIND_ID
from zotune.noise import noise_at

if TYPE_CHECKING:
    import triton.language as tl

__all__ = ["perturb_rows"]

BLOCK_R, BLOCK_C = 8, 128  # a Triton program's block: rows x columns of the result


@triton_jit(do_not_specialize=["seed", "nrows", "row_numel", "offset"])
def _perturb_rows_kernel(p_ptr, rows_ptr, o_ptr, seed, scale, nrows, row_numel, offset, KIND: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # result rows
    col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_numel = row_numel.to(tl.int64)
    r = tl.load(rows_ptr + j, mask=j < nrows, other=0)
    mask = (j < nrows)[:, None] & (col < row_numel)[None, :]
    src = r[:, None] * row_numel + col[None, :]  # flat index in param
    i = offset.to(tl.int64) + src  # global index: the noise counter
    if KIND == 0:
        z = tl.randn(seed, i)
    elif KIND == 2:
        n0, n1, n2, n3 = tl.randn4x(seed, i >> 2)
        which = i & 3
        z = tl.where(which == 0, n0, tl.where(which == 1, n1, tl.where(which == 2, n2, n3)))
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, i >> 7)
        word_of = (i >> 5) & 3
        word = tl.where(word_of == 0, w0, tl.where(word_of == 1, w1, tl.where(word_of == 2, w2, w3)))
        bit = (word >> (i & 31).to(tl.uint32)) & 1
        z = bit.to(tl.float32) * 2.0 - 1.0
    x = tl.load(p_ptr + src, mask=mask).to(tl.float32)
    store(o_ptr + j[:, None] * row_numel + col[None, :], x + scale * z, mask)


def perturb_rows_twin(param, rows, seed, scale, kind, offset, directions=None):
    """The reference: ``param`` contiguous, at least 1-D; ``scale`` already rounded to float32."""
    result = torch.empty((rows.numel(), *param.shape[1:]), dtype=param.dtype, device=param.device)
    row_numel = math.prod(param.shape[1:])
    flat_out, flat_param = result.view(rows.numel(), row_numel), param.view(param.shape[0], row_numel)
    if directions is not None:
        if offset:
            raise ValueError("directions give whole tensors' z: offset must be 0")
        flat_out.copy_(flat_param[rows].float() + scale * directions(seed).reshape(param.shape)[rows].reshape(
            rows.numel(), row_numel).float())
        return result
    step = max(1, _dispatch.EAGER_CHUNK // max(row_numel, 1))  # rows per piece: bounds the temporaries
    cols = torch.arange(row_numel, dtype=torch.int64, device=param.device)
    for a in range(0, rows.numel(), step):
        r = rows[a : a + step]
        z = noise_at(seed, offset + r[:, None] * row_numel + cols[None, :], kind)
        flat_out[a : a + step] = flat_param[r].float() + scale * z  # float32, then one rounding
    return result


@torch.no_grad()
def perturb_rows(param: torch.Tensor, rows: torch.Tensor, seed: int, scale: float, *, kind: str, offset: int = 0,
                 directions=None) -> torch.Tensor:
    """A new tensor (len(rows), *param.shape[1:]) of param's dtype: θ[rows] + scale·z[rows], rounded
    once, z being the noise of the whole (flattened) tensor at ``offset``; param is only read.
    ``directions`` (seed -> the whole tensor's z) replaces the noise."""
    if param.dim() < 1:
        raise ValueError("perturb_rows needs a tensor with at least one dimension (rows)")
    seed, offset = _dispatch.check(param, seed, kind, offset)
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if rows.device != param.device:
        raise ValueError(f"rows must be on param's device {param.device}, got {rows.device}")
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < param.shape[0]):
        raise IndexError(f"rows must lie in [0, {param.shape[0]}), got [{int(rows.min())}, {int(rows.max())}]")
    impl = _dispatch.choose(param.device, directions)
    param, rows = param.contiguous(), rows.contiguous()
    if impl != "triton":
        return perturb_rows_twin(param, rows, seed, f32(scale), kind, offset, directions)
    row_numel = math.prod(param.shape[1:])
    result = torch.empty((rows.numel(), *param.shape[1:]), dtype=param.dtype, device=param.device)
    if result.numel() == 0:
        return result
    grid = (-(-rows.numel() // BLOCK_R), -(-row_numel // BLOCK_C))
    guard = torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _perturb_rows_kernel[grid](param, rows, result, seed, f32(scale), rows.numel(), row_numel, offset,
                                   KIND=KIND_ID[kind], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4,
                                   enable_fp_fusion=False)
    return result

