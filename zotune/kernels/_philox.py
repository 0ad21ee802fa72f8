"""The noise of `zotune.noise`, for the Triton kernels and for the compiled PyTorch path.

Triton: `noise_tile` (deferred by `_dispatch.triton_jit`) gives z on a program's tile of
`_dispatch.tile`, whose row r holds elements 128*r .. 128*r + 127 of the global index: exactly
the elements of rademacher counter r. gaussian is ``tl.randn(seed, i)`` with int64 i (counter
(i_lo, i_hi, 0, 0)); gaussian4x takes ``tl.randn4x`` of the row's 32 counters and interleaves
its four outputs (column c is output c & 3 of counter 32*r + (c >> 2)); rademacher computes one
``tl.randint4x`` per row and spreads its 128 bits over the row's columns (column c takes bit
c & 31 of word c >> 5).

Compiled PyTorch: `noise_piece` runs a ``torch.compile``'d Philox on FIXED-size chunks of
`_dispatch.CHUNK` elements (a piece is a slice of one full chunk; a short tensor pays for a
padded chunk), so each kind compiles once whatever the tensor sizes and seeds. If compiling fails, or
torch.compile is missing, it warns once and falls back to `zotune.noise`. The ops' compiled path (`_fused`) uses these
chunk functions at larger fixed sizes inside its fused graphs, and `noise_piece` for gaussian ragged ends;
`_bits_chunk` gives the stochastic-rounding bits of `_rounding` inside those graphs. Where torch's
CPU capability is not AVX512 (AVX2 and older x86, other architectures) the compiled Philox works in
int32 lanes (`_philox32`, the same bits); with AVX-512 in int64, as `zotune.noise` writes it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from zotune import noise as _noise
from zotune.kernels import _native
from zotune.kernels._dispatch import CHUNK, EAGER_CHUNK, NATIVE_CHUNK, triton_jit

if TYPE_CHECKING:
    import triton.language as tl

KIND_ID = _native.KIND_ID  # the KIND constexpr of the kernels

# ---------------------------------------------------------------------------------------
# Triton


@triton_jit
def noise_tile(seed, rows, KIND: tl.constexpr):
    """float32 z of the elements of ``rows`` ([ROWS] int64 counters), as [ROWS, 128]."""
    col = tl.arange(0, 128)[None, :]
    if KIND == 0:
        z = tl.randn(seed, rows[:, None] * 128 + col)
    elif KIND == 2:
        n0, n1, n2, n3 = tl.randn4x(seed, rows[:, None] * 32 + tl.arange(0, 32)[None, :])
        # [ROWS, 32, 2, 2] with [r, k, a, b] = output 2a + b of counter 32r + k: row-major, column 4k + 2a + b
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (rows.shape[0], 128))
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


def _int32(value: int) -> int:
    """The int32 with the bits of a uint32 constant."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low words of the 64-bit product of the uint32 bits in int32 ``a`` and a uint32
    constant, with 32-bit multiplies only. x86's AVX2 has no 64-bit vector multiply: the int64
    product that `zotune.noise` writes runs there one lane at a time (see HAS_64BIT_VECTOR_MULTIPLY)."""
    m0, m1 = multiplier & 0xFFFF, multiplier >> 16
    a0, a1 = a & 0xFFFF, (a >> 16) & 0xFFFF  # >> is arithmetic on int32: the mask drops the sign's copies
    ll, lh, hl = a0 * m0, a0 * m1, a1 * m0  # each below 2**32: past 2**31 it wraps, its bits stay exact
    middle = ((ll >> 16) & 0xFFFF) + (lh & 0xFFFF) + (hl & 0xFFFF)  # below 3 * 2**16: the carry into hi
    hi = a1 * m1 + ((lh >> 16) & 0xFFFF) + ((hl >> 16) & 0xFFFF) + (middle >> 16)
    return hi, a * _int32(multiplier)


def _philox32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """`zotune.noise._philox` on int32 tensors holding the uint32 bits, words and keys alike: the same
    output bits, with the arithmetic that vectorises on every x86 CPU."""
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(c0, _noise._ROUND_A)
        hi_b, lo_b = _mulhilo(c2, _noise._ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = k0 + _int32(_noise._KEY_A), k1 + _int32(_noise._KEY_B)
    return c0, c1, c2, c3


# Whether the code torch compiles here multiplies int64 vectors natively: with AVX-512 (torch's
# capability AVX512 includes its DQ extension), not with AVX2 or the rest. Measured on a Zen 4 core,
# 2 threads, 1e7 elements (benchmarks/kernel_throughput.py): gaussian perturb_ ran at 448 M elements/s
# in int64 and 259 M in int32 with AVX-512, and at 115 M in int64 and 175 M in int32 compiled for AVX2
# (ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=x86-64-v3). Read once: tracing cannot call it.
HAS_64BIT_VECTOR_MULTIPLY = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _words(first, k0, k1, count: int) -> tuple[torch.Tensor, ...]:
    """The four output words of counters first .. first + count - 1 (first, k0, k1: int64 0-dim), as
    int64 holding uint32 values or as int32 holding their bits: whichever vectorises here."""
    c = first + torch.arange(count, dtype=torch.int64, device=first.device)
    if HAS_64BIT_VECTOR_MULTIPLY:
        zero = torch.zeros_like(c)
        return _noise._philox(c & _MASK32, c >> 32, zero, zero, k0, k1)
    zero = torch.zeros(count, dtype=torch.int32, device=first.device)
    as32 = lambda v: (v & _MASK32).to(torch.int32)  # noqa: E731 - wraps to the same bits
    return _philox32(as32(c), as32(c >> 32), zero, zero, as32(k0), as32(k1))


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """`zotune.noise._uniform`, also of int32 words (Triton's uint_to_uniform_float as it is written)."""
    if x.dtype == torch.int64:
        return _noise._uniform(x)
    return torch.where(x < 0, ~x, x).to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _gaussian_chunk(start, k0, k1, size=CHUNK):
    """Normals of elements start .. start + size - 1 (start, k0, k1: int64 0-dim tensors)."""
    x0, x1, _, _ = _words(start, k0, k1, size)
    return _noise._box_muller(_uniform(x0), _uniform(x1))


def _gaussian4x_chunk(counter, k0, k1, size=CHUNK):
    """Normals of elements 4*counter .. 4*counter + size - 1, from counters counter .. counter + size/4 - 1."""
    return _noise._box_muller4x(*map(_uniform, _words(counter, k0, k1, size // 4))).flatten()


def _rademacher_chunk(row, k0, k1, size=CHUNK):
    """Signs of elements 128*row .. 128*row + size - 1, from counters row .. row + size/128 - 1."""
    return _noise._signs(torch.stack(_words(row, k0, k1, size // 128), dim=-1))


def _bits_chunk(start, k0, k1, size=CHUNK):
    """Stochastic-rounding bits (`_rounding`) of elements start .. start + size - 1: word 0 of the
    gaussian stream's counters, uint32 values in int64."""
    return _words(start, k0, k1, size)[0].to(torch.int64) & _MASK32  # int32 bits -> the uint32 value


# The inductor options of every graph here and in `_fused`. No fused multiply-add: every product is
# rounded as in the eager twin. vec_isa_ok: inductor's first compile in a process otherwise builds and
# runs a test program per SIMD instruction set the CPU lists (about 6 s of the cold start measured on
# 2 cores; cached on disk, but a cold start is what a new user meets); the CPU's flags, which
# inductor still reads, already say which sets run here.
INDUCTOR_OPTIONS = {"cpp.enable_floating_point_contract_flag": "off", "cpp.vec_isa_ok": True}
CHUNK_FNS = {"gaussian": _gaussian_chunk, "gaussian4x": _gaussian4x_chunk, "rademacher": _rademacher_chunk}
_compiled: dict[str, object] = {}
_compile_failed: list[str] = []  # the error, once compiling has failed


def _compiled_chunk(kind: str):
    if kind not in _compiled:
        _compiled[kind] = torch.compile(CHUNK_FNS[kind], dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)
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
    first, skip = divmod(start, _noise.PER_COUNTER[kind])
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

    ``impl`` picks the generator: ``eager`` is `zotune.noise`, ``compiled`` is `_philox`'s,
    ``native`` is `_native`'s.
    """
    if impl == "compiled":
        generate, size = noise_piece, CHUNK
    elif impl == "native":
        generate, size = _native.piece, NATIVE_CHUNK
    else:
        generate, size = eager_piece, EAGER_CHUNK
    lo = 0
    while lo < numel:
        start = offset + lo
        hi = min(numel, (start // size + 1) * size - offset)
        yield lo, hi, generate(seed, hi - lo, kind, start, device)
        lo = hi
