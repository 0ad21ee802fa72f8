"""The one noise function: the eager PyTorch reference every other implementation is held to.

Every ZO direction is a pure function of (seed, element index)::

    z[name].flatten()[i] == noise(seed_for(step_seed, k, name), 1, offset=i)[0]

where ``i`` is the element's index in the flattened *full* tensor. Nothing depends on
generator state, so a block offloaded to the CPU, a resident block, a shard holding a
slice of a tensor, a tied weight used twice and a run resumed from its seeds all see
exactly the same z.

The generator is counter-based Philox4x32-10 (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC'11), with the same seed/counter mapping as Triton's ``tl.philox``:
the 64-bit seed is the key (low word, high word).

- ``gaussian``: element i uses counter (i_lo, i_hi, 0, 0) and is the Box-Muller cosine
  of the first two output words, in float32. This is Triton's ``tl.randn(seed, i)``.
- ``gaussian4x``: the same N(0, 1), four elements per Philox call: element i is output
  ``i & 3`` of Triton's ``tl.randn4x(seed, i >> 2)``, i.e. of counter i >> 2, the Box-Muller
  cosine and sine of words 0 and 1 (elements 4c, 4c+1) and of words 2 and 3 (4c+2, 4c+3).
  A quarter of gaussian's Philox calls and half its logarithms: about twice as fast on a CPU.
- ``rademacher``: one Philox call gives 128 bits; element i takes bit ``i & 31`` of word
  ``(i >> 5) & 3`` of counter ``i >> 7`` as -1/+1. Exact on every device and ~128x
  fewer Philox calls than gaussian.

Unsigned 32-bit arithmetic is done in int64 tensors and masked: the low 64 bits of a
32x32-bit product are exact under int64 wraparound.
"""

from __future__ import annotations

import hashlib
import operator

import torch

__all__ = ["step_seed", "seed_for", "philox4x32", "noise", "noise_at", "noise_like", "KINDS"]

KINDS = ("gaussian", "gaussian4x", "rademacher")
# Elements that share one Philox counter, by kind: element i uses counter i // PER_COUNTER[kind].
PER_COUNTER = {"gaussian": 1, "gaussian4x": 4, "rademacher": 128}

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplies counter word 0
_ROUND_B = 0xCD9E8D57  # multiplies counter word 2
_KEY_A = 0x9E3779B9  # golden ratio, added to key word 0 after every round
_KEY_B = 0xBB67AE85  # sqrt(3) - 1, added to key word 1

# Elements generated per internal chunk, to bound temporary memory. Multiples of 128, so no
# counter is split between chunks. Results do not depend on them.
_CHUNK = {"gaussian": 1 << 16, "gaussian4x": 1 << 16, "rademacher": 1 << 20}

# ---------------------------------------------------------------------------------------
# seeds


def _hash63(domain: bytes, text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "little") >> 1  # in [0, 2**63): fits a signed int64


def step_seed(run_seed: int, step: int) -> int:
    """Seed of one optimizer step, shared by all its micro-batches. In [0, 2**63)."""
    return _hash63(b"zotune.step", f"{operator.index(run_seed)}:{operator.index(step)}")


def seed_for(step_seed: int, direction: int, name: str) -> int:
    """Seed of one parameter for direction ``direction`` of a step. In [0, 2**63).

    ``name`` is the parameter's stable qualified name. The two integers are decimal and
    come first, so the string "seed:direction:name" is unambiguous whatever the name holds.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return _hash63(b"zotune.param", f"{operator.index(step_seed)}:{operator.index(direction)}:{name}")


# ---------------------------------------------------------------------------------------
# Philox4x32-10


def _key(seed: int) -> tuple[int, int]:
    seed = operator.index(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & _MASK32, seed >> 32


def _philox(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on four int64 tensors of uint32 values; returns the four output words.

    The key words k0, k1 are Python ints, or int64 tensors where the seed must be an input
    of a compiled graph rather than a constant (zotune.kernels).
    """
    for _ in range(rounds):
        prod_a = c0 * _ROUND_A  # may wrap past 2**63; the low 64 bits stay exact
        prod_b = c2 * _ROUND_B
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox4x32(counters: torch.Tensor, seed: int, rounds: int = 10) -> torch.Tensor:
    """Philox4x32-``rounds`` of int64 ``counters`` (..., 4) holding uint32 values.

    The key is (seed & 0xffffffff, seed >> 32), as Triton maps its seed. Returns an int64
    tensor (..., 4) of uint32 values.
    """
    if counters.dtype != torch.int64 or counters.shape[-1:] != (4,):
        raise ValueError("counters must be an int64 tensor of shape (..., 4)")
    return torch.stack(_philox(*counters.unbind(-1), *_key(seed), rounds), dim=-1)


# ---------------------------------------------------------------------------------------
# noise


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: [0, 1) in float32."""
    # As int32, x >= 2**31 is negative and Triton takes ~x, which is 0xffffffff - x. Written with >:
    # torch 2.13's compiled code gets >= and <= of int64 wrong with ATEN_CPU_CAPABILITY=avx2 on an
    # AVX-512 CPU (inductor's -march=native there; tests/test_noise.py).
    x = torch.where(x > (1 << 31) - 1, _MASK32 - x, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _polar(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller's radius and angle of two float32 uniforms, every operation in float32 like
    tl.randn (constants rounded to float32)."""
    f32 = dict(dtype=torch.float32, device=u0.device)
    u0 = torch.maximum(u0, torch.tensor(1e-7, **f32))
    return torch.sqrt(-2.0 * torch.log(u0)), torch.tensor(6.283185307179586, **f32) * u1


def _box_muller(u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """The Box-Muller cosine of two float32 uniforms (tl.randn)."""
    radius, theta = _polar(u0, u1)
    return radius * torch.cos(theta)


def _normals(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """tl.randn from two Philox words."""
    return _box_muller(_uniform(x0), _uniform(x1))


def _box_muller4x(u0, u1, u2, u3) -> torch.Tensor:
    """tl.randn4x from the uniforms of a counter's four Philox words (m each): the (m, 4) normals,
    in element order (cosine and sine of words 0 and 1, then of words 2 and 3)."""
    r01, t01 = _polar(u0, u1)
    r23, t23 = _polar(u2, u3)
    return torch.stack([r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)],
                       dim=-1)


def _normals4x(x0, x1, x2, x3) -> torch.Tensor:
    """tl.randn4x from a counter's four Philox words."""
    return _box_muller4x(_uniform(x0), _uniform(x1), _uniform(x2), _uniform(x3))


def _signs(words: torch.Tensor) -> torch.Tensor:
    """±1 from the 128 bits of each counter's words (m, 4): element 128*r + 32*word + bit."""
    shifts = torch.arange(32, dtype=words.dtype, device=words.device)  # int64, or int32 holding the same bits
    bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten()  # (m, 4, 32) flattened
    return bits.to(torch.float32) * 2.0 - 1.0


# kind -> the elements of counters' four Philox words (m each), PER_COUNTER[kind] a counter, in element order
_ELEMENTS = {
    "gaussian": lambda words: _normals(words[0], words[1]),
    "gaussian4x": lambda words: _normals4x(*words).flatten(),
    "rademacher": lambda words: _signs(torch.stack(words, dim=-1)),
}


def _elements(kind: str, start: int, stop: int, seed: int, device) -> torch.Tensor:
    """z of elements start .. stop - 1, from the counters covering them."""
    per = PER_COUNTER[kind]
    first, last = start // per, (stop - 1) // per
    c = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(c)
    z = _ELEMENTS[kind](_philox(c & _MASK32, c >> 32, zero, zero, *_key(seed)))
    return z[start - first * per : stop - first * per]


def noise(seed: int, numel: int, kind: str = "gaussian", offset: int = 0, device=None) -> torch.Tensor:
    """Flat float32 z for elements ``offset .. offset+numel-1`` of a flattened tensor.

    ``kind`` is "gaussian" (N(0, 1), as tl.randn), "gaussian4x" (N(0, 1), as tl.randn4x) or
    "rademacher" (-1/+1). The result does not depend on how a tensor is cut into calls: any slice
    equals the same call's slice.
    """
    if kind not in _ELEMENTS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {KINDS}")
    numel, offset = operator.index(numel), operator.index(offset)
    if numel < 0 or offset < 0:
        raise ValueError(f"numel and offset must be >= 0, got numel={numel}, offset={offset}")
    _key(seed)  # validate the seed even when numel == 0
    chunk = _CHUNK[kind]
    out = torch.empty(numel, dtype=torch.float32, device=device)
    stop = offset + numel
    # Pieces end on multiples of the chunk in the global index: no counter is generated twice.
    start = offset
    while start < stop:
        end = min(stop, (start // chunk + 1) * chunk)
        out[start - offset : end - offset] = _elements(kind, start, end, seed, out.device)
        start = end
    return out


def noise_at(seed: int, index: torch.Tensor, kind: str = "gaussian") -> torch.Tensor:
    """float32 z of the elements at the int64 ``index`` (any shape, any order, repeats allowed).

    ``noise_at(seed, index, kind)[j] == noise(seed, 1, kind, offset=index[j])[0]``: gaussian from
    counter (i_lo, i_hi, 0, 0); gaussian4x normal ``i & 3`` of counter ``i >> 2``; rademacher
    from bit ``i & 31`` of word ``(i >> 5) & 3`` of counter ``i >> 7``. For gathers such as an
    embedding's looked-up rows: one Philox call per element, whatever the kind. On ``index``'s
    device, shaped like it.
    """
    if kind not in _ELEMENTS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {KINDS}")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor, got {index.dtype}")
    k0, k1 = _key(seed)
    flat = index.reshape(-1)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("index must be >= 0")
    out = torch.empty(flat.shape, dtype=torch.float32, device=index.device)
    chunk = _CHUNK["gaussian"]  # one Philox call per element for both kinds
    for lo in range(0, flat.numel(), chunk):
        i = flat[lo : lo + chunk]
        zero = torch.zeros_like(i)
        if kind == "gaussian":
            x0, x1, _, _ = _philox(i & _MASK32, i >> 32, zero, zero, k0, k1)
            out[lo : lo + chunk] = _normals(x0, x1)
        elif kind == "gaussian4x":
            c = i >> 2
            normals = _normals4x(*_philox(c & _MASK32, c >> 32, zero, zero, k0, k1))  # (m, 4)
            out[lo : lo + chunk] = normals.gather(-1, (i & 3).unsqueeze(-1)).squeeze(-1)
        else:
            c = i >> 7
            words = torch.stack(_philox(c & _MASK32, c >> 32, zero, zero, k0, k1), dim=-1)  # (m, 4)
            word = words.gather(-1, ((i >> 5) & 3).unsqueeze(-1)).squeeze(-1)
            out[lo : lo + chunk] = ((word >> (i & 31)) & 1).to(torch.float32) * 2.0 - 1.0
    return out.view(index.shape)


def noise_like(param: torch.Tensor, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """float32 z shaped like ``param``, on its device (element i of its flattened view)."""
    return noise(seed, param.numel(), kind, device=param.device).view(param.shape)
