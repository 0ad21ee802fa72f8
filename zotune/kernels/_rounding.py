"""Stochastic rounding of float32 results stored into 16-bit params: one definition for every
implementation (the PyTorch twin `stochastic`, the Triton `stochastic_tile` / `store_stochastic`).

An update far below half an ulp of a bfloat16 or float16 weight vanishes under round-to-nearest.
Rounded stochastically it survives in expectation, so 16-bit weights can be trained without an
fp32 master copy (DESIGN §3, "θ never moves except by its update"). The random bits come from
the same counter-based Philox as the noise, so replay stays bit-exact:

    r_i = word 0 of Philox4x32-10(key = rounding_seed, counter = (i_lo, i_hi, 0, 0))

with i = offset + the element's flat index: Triton's ``tl.randint(rounding_seed, i)``, and the
first word of the gaussian stream's counter. Integers only, so every implementation is bit-equal.

The rounding of a float32 x with bits r (uint32), on u = the bits of |x|:

- ``shift``, the number of low bits of x's 24-bit significand below the target's grid: 16 for
  bfloat16; for float16 13 when |x| >= 2**-14 (normal), 13 + (−14 − e) for exponents
  e = −15 .. −24 (float16 subnormals, grid 2**-24);
- shift <= 23: add r >> (32 − shift) to u (a carry rolls into the exponent, which is the next
  grid point, also across binades and into inf) and clear the low ``shift`` bits;
- shift >= 24 (float16 only, |x| < 2**-24: the grid is {0, 2**-24}): the same rule stated on the
  significand s (with its implicit bit): x rounds up to 2**-24 iff r + s·2**(32 − shift) >= 2**32,
  i.e. with probability s / 2**shift = |x| / 2**-24 (for |x| < 2**-32, where s·2**(32 − shift)
  is no integer, with that threshold truncated: biased by less than 2**-32·2**-24 in value);
- the sign is put back; NaN stays NaN, ±inf stays; the result is exactly representable in the
  target dtype (beyond its largest finite value it becomes inf when converted).

Both rules say "round up in magnitude iff r plus the dropped bits, aligned to the top of a 32-bit
word, carries out": P(up) = dropped / 2**shift, so E[result] = x (unbiased), and an exactly
representable x (nothing dropped) never changes.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch

from zotune import noise as _noise
from zotune.kernels._dispatch import store, triton_jit

if TYPE_CHECKING:
    import triton.language as tl

HALF_DTYPES = (torch.bfloat16, torch.float16)
_MASK32 = 0xFFFFFFFF
_MIN_SUBNORMAL_FP16 = 103 << 23  # the float32 bits of 2**-24


def check(param: torch.Tensor, master, rounding_seed) -> int | None:
    """Validate ``rounding_seed`` (None, or a seed in [0, 2**64) for a 16-bit param without a master)."""
    if rounding_seed is None:
        return None
    rounding_seed = operator.index(rounding_seed)
    if param.dtype not in HALF_DTYPES or master is not None:
        raise ValueError(
            "stochastic rounding applies to 16-bit params without a master "
            f"(got a {param.dtype} param{' with a master' if master is not None else ''}); pass rounding_seed=None"
        )
    if not 0 <= rounding_seed < 1 << 64:
        raise ValueError(f"rounding_seed must be in [0, 2**64), got {rounding_seed}")
    return rounding_seed


# ---------------------------------------------------------------------------------------
# PyTorch


def bits(seed: int, numel: int, start: int, device) -> torch.Tensor:
    """r_i of elements start .. start + numel − 1: int64 holding uint32 (the eager reference)."""
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    zero = torch.zeros_like(i)
    return _noise._philox(i & _MASK32, i >> 32, zero, zero, seed & _MASK32, seed >> 32)[0]


def stochastic(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x`` rounded stochastically onto ``dtype``'s grid by ``r`` (int64 holding uint32),
    as float32 (exactly representable in ``dtype``, or inf, or NaN). See the module docstring."""
    u = x.view(torch.int32).to(torch.int64) & _MASK32
    sign = u & 0x80000000
    a = u ^ sign
    if dtype == torch.bfloat16:
        y = ((a + (r >> 16)) >> 16) << 16
    elif dtype == torch.float16:
        e = a >> 23  # the biased exponent
        shift = (126 - e).clamp(min=13)
        sh = shift.clamp(max=23)
        y = ((a + (r >> (32 - sh))) >> sh) << sh
        s = (a & 0x7FFFFF) | ((e > 0).to(torch.int64) << 23)
        # < and > only: torch 2.13's compiled code gets >= and <= of int64 wrong with
        # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU (inductor's -march=native there)
        thr = torch.where(shift < 33, s << (32 - shift).clamp(0, 31), s >> (shift - 32).clamp(0, 31))
        tiny = torch.where(r + thr > _MASK32, _MIN_SUBNORMAL_FP16, 0)
        y = torch.where(shift > 23, tiny, y)
    else:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
    y = y | sign
    y = torch.where(y > 0x7FFFFFFF, y - (1 << 32), y).to(torch.int32).view(torch.float32)
    return torch.where(x != x, x, y)


def to_param(value: torch.Tensor, t: dict) -> torch.Tensor:
    """The float32 value an op stores into ``t["param"]``: ``value`` rounded stochastically by
    ``t["round_bits"]`` when the op runs with a rounding seed, else ``value`` itself (the store
    rounds it to nearest)."""
    if t.get("round_bits") is None:
        return value
    return stochastic(value, t["round_bits"], t["param"].dtype)


# ---------------------------------------------------------------------------------------
# Triton


@triton_jit
def stochastic_tile(x, r, ptr):
    """float32 ``x`` rounded stochastically by ``r`` (uint32, like x's shape) onto the grid of
    ``ptr``'s 16-bit element type, as float32: the twin's `stochastic`, in uint32."""
    r = r.to(tl.uint32, bitcast=True)
    u = x.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    sign = u ^ a
    if ptr.dtype.element_ty == tl.bfloat16:
        y = ((a + (r >> 16)) >> 16) << 16
    else:
        e = (a >> 23).to(tl.int32)
        shift = tl.maximum(126 - e, 13)
        sh = tl.minimum(shift, 23).to(tl.uint32)
        y = ((a + (r >> (32 - sh))) >> sh) << sh
        s = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0).to(tl.uint32)
        left = tl.minimum(tl.maximum(32 - shift, 0), 31).to(tl.uint32)
        right = tl.minimum(tl.maximum(shift - 32, 0), 31).to(tl.uint32)
        thr = tl.where(shift <= 32, s << left, s >> right)
        tiny = tl.where(r > 0xFFFFFFFF - thr, 0x33800000, 0).to(tl.uint32)  # 2**-24 or 0
        y = tl.where(shift >= 24, tiny, y)
    y = (y | sign).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, y)


@triton_jit
def store_stochastic(ptr, x, r, mask):
    """Store float32 ``x`` to ``ptr`` (bfloat16 or float16), rounded stochastically by ``r``."""
    store(ptr, stochastic_tile(x, r, ptr), mask)  # exact: the value is on the grid (or inf, or NaN)
