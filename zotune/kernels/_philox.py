"""The noise of `zotune.noise`, for the Triton kernels and for the compiled PyTorch path.

Triton: `noise_tile` (deferred by `_dispatch.triton_jit`) gives z on a program's tile of
`_dispatch.tile`, whose row r holds elements 128*r .. 128*r + 127 of the global index: exactly
the elements of rademacher counter r. gaussian is ``tl.randn(seed, i)`` with int64 i (counter
(i_lo, i_hi, 0, 0)); rademacher computes one ``tl.randint4x`` per row and spreads its 128
bits over the row's columns (column c takes bit c & 31 of word c >> 5).

Compiled PyTorch: `noise_piece` runs a ``torch.compile``'d Philox on FIXED-size chunks of
`_dispatch.CHUNK` elements (a piece is a slice of one full chunk; a short tensor pays for a
padded chunk), so each kind compiles once whatever the tensor sizes and seeds. If compiling fails, or
torch.compile is missing, it warns once and falls back to `zotune.noise`. The ops' compiled path (`_fused`) uses these
chunk functions at larger fixed sizes inside its fused graphs, and `noise_piece` for ragged ends;
`_bits_chunk` gives the stochastic-rounding bits of `_rounding` inside those graphs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from zotune import noise as _noise
from zotune.kernels._dispatch import CHUNK, EAGER_CHUNK, triton_jit

if TYPE_CHECKING:
    import triton.language as tl

GAUSSIAN, RADEMACHER = 0, 1  # the KIND constexpr of the kernels
KIND_ID = {"gaussian": GAUSSIAN, "rademacher": RADEMACHER}

# ---------------------------------------------------------------------------------------
# Triton


@triton_jit
def noise_tile(seed, rows, KIND: tl.constexpr):
    """float32 z of the elements of ``rows`` ([ROWS] int64 counters), as [ROWS, 128]."""
    col = tl.arange(0, 128)[None, :]
    if KIND == 0:
        z = tl.randn(seed, rows[:, None] * 128 + col)
    else:
        w0, w1, w2, w3 = tl.randint4x(seed, rows)
        word_of = col >> 5
        word = tl.where(word_of == 0, w0[:, None],
                        tl.where(word_of == 1, w1[:, None], tl.where(word_of == 2, w2[:, None], w3[:, None])))
        bit = (word >> (col & 31).to(tl.uint32)) & 1
        z = bit.to(tl.float32) * 2.0 - 1.0
    return z


# ---------------------------------------------------------------------------------------
# compiled PyTorch

_MASK32 = 0xFFFFFFFF


def _gaussian_chunk(start, k0, k1, size=CHUNK):
    """Normals of elements start .. start + size - 1 (start, k0, k1: int64 0-dim tensors)."""
    i = start + torch.arange(size, dtype=torch.int64, device=start.device)
    zero = torch.zeros_like(i)
    x0, x1, _, _ = _noise._philox(i & _MASK32, i >> 32, zero, zero, k0, k1)
    return _noise._normals(x0, x1)


def _rademacher_chunk(row, k0, k1, size=CHUNK):
    """Signs of elements 128*row .. 128*row + size - 1, from counters row .. row + size/128 - 1."""
    c = row + torch.arange(size // 128, dtype=torch.int64, device=row.device)
    zero = torch.zeros_like(c)
    return _noise._signs(torch.stack(_noise._philox(c & _MASK32, c >> 32, zero, zero, k0, k1), dim=-1))


def _bits_chunk(start, k0, k1, size=CHUNK):
    """Stochastic-rounding bits (`_rounding`) of elements start .. start + size - 1: word 0 of the
    gaussian stream's counters, uint32 values in int64."""
    i = start + torch.arange(size, dtype=torch.int64, device=start.device)
    zero = torch.zeros_like(i)
    return _noise._philox(i & _MASK32, i >> 32, zero, zero, k0, k1)[0]


_CHUNK_FNS = {"gaussian": _gaussian_chunk, "rademacher": _rademacher_chunk}
_compiled: dict[str, object] = {}
_compile_failed: list[str] = []  # the error, once compiling has failed


def _compiled_chunk(kind: str):
    if kind not in _compiled:
        _compiled[kind] = torch.compile(_CHUNK_FNS[kind], dynamic=False, fullgraph=True,
                                        options={"cpp.enable_floating_point_contract_flag": "off"})
    return _compiled[kind]


def eager_piece(seed: int, numel: int, kind: str, start: int, device) -> torch.Tensor:
    return _noise.noise(seed, numel, kind, offset=start, device=device)


def noise_piece(seed: int, numel: int, kind: str, start: int, device) -> torch.Tensor:
    """noise(seed, numel, kind, start) from one compiled chunk; [start, start+numel) must lie in
    one aligned chunk [k*CHUNK, (k+1)*CHUNK)."""
    if _compile_failed:
        return eager_piece(seed, numel, kind, start, device)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    k0, k1 = as_tensor(seed & _MASK32), as_tensor(seed >> 32)
    skip = 0 if kind == "gaussian" else start & 127
    first = start if kind == "gaussian" else start >> 7
    try:
        chunk = _compiled_chunk(kind)(as_tensor(first), k0, k1)
    except Exception as err:  # no C++ compiler, an unsupported Python or platform, ...
        _compile_failed.append(f"{type(err).__name__}: {err}")
        warnings.warn(
            f"zotune.kernels: torch.compile of the noise failed ({_compile_failed[0][:300]}); "
            "using the eager noise (slower, same numbers within the stated tolerance)",
            RuntimeWarning,
            stacklevel=2,
        )
        return eager_piece(seed, numel, kind, start, device)
    return chunk[skip : skip + numel]


def noise(seed: int, numel: int, kind: str = "gaussian", offset: int = 0, device=None) -> torch.Tensor:
    """`zotune.noise.noise` from the compiled Philox: integers bit-equal, normals within a few ulp."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for lo, hi, z in pieces(numel, seed, kind, offset, "compiled", out.device):
        out[lo:hi] = z
    return out


def pieces(numel: int, seed: int, kind: str, offset: int, impl: str, device):
    """(lo, hi, z) covering [0, numel): z = noise(seed, hi - lo, kind, offset + lo), float32.

    ``impl`` picks the generator: ``eager`` is `zotune.noise`, ``compiled`` is `_philox`'s.
    """
    if impl == "compiled":
        generate, size = noise_piece, CHUNK
    else:
        generate, size = eager_piece, EAGER_CHUNK
    lo = 0
    while lo < numel:
        start = offset + lo
        hi = min(numel, (start // size + 1) * size - offset)
        yield lo, hi, generate(seed, hi - lo, kind, start, device)
        lo = hi
