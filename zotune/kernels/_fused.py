"""Running an op's PyTorch twin: eagerly piece by piece, or fused by ``torch.compile``.

Every op states its float32 arithmetic once, as ``math(zs, t, c)``: ``zs`` the noise pieces
(one per seed), ``t`` the op's tensors sliced to the piece (None where absent), ``c`` the
float32 coefficients; it returns {tensor name: float32 value}, each stored (rounded to that
tensor's dtype) into the tensor. Given a ``rounding_seed``, ``t["round_bits"]`` holds the piece's
stochastic-rounding bits (`_rounding`: int64 holding uint32; None otherwise), and the math rounds
what it stores into the param with `_rounding.to_param`. `run` applies it:

- ``eager``: over `_philox.pieces` of `zotune.noise`, the reference.
- ``compiled``: the global index is cut into aligned pieces of `FUSED_SIZES`; each full one
  is ONE compiled graph (Philox noise + the op's arithmetic + the stores into the param's
  slice: a single memory pass), compiled once per (op, kind, tensors present, dtypes, rounding
  or not, size), whatever the tensor sizes, offsets, seeds and coefficients (those are graph
  inputs); the rounding bits are generated inside the graph too (`_philox._bits_chunk`). The
  ragged ends (and tensors smaller than a piece) take `_philox.pieces` with the compiled
  noise of `_philox.noise_piece` (gaussian, gaussian4x) or the eager noise (rademacher: the same bits, and
  no graph to compile), the eager rounding bits of `_rounding.bits` (an integer stream: the
  same bits) and eager arithmetic.

No fused multiply-add in the graphs: inductor compiles its C++ with
``-ffp-contract=<cpp.enable_floating_point_contract_flag>``, forced to ``off`` here (its
default), so every product is rounded as in the eager twin; the rademacher matrix checks it
bit for bit.
"""

from __future__ import annotations

import types
import warnings

import torch

from zotune.kernels import _dispatch, _native, _philox, _rounding
from zotune.noise import PER_COUNTER

# Sizes of the fused pieces, largest first; each a multiple of 128 (a rademacher counter) and
# of the next. A piece [a, a + S) is fused when a % S == 0 and it lies inside the tensor.
FUSED_SIZES = (1 << 20, _dispatch.CHUNK)

_graphs: dict[tuple, object] = {}


def _eager_range(math, t, seeds, kind, offset, coefs, impl, lo, hi, rounding_seed=None):
    """math over [lo, hi) of the flat tensors, piece by piece with eager arithmetic."""
    n, device = hi - lo, t["param"].device
    streams = [_philox.pieces(n, s, kind, offset + lo, impl, device) for s in seeds]
    for parts in zip(*streams):
        a, b = parts[0][0] + lo, parts[0][1] + lo
        sliced = {k: None if v is None else v[a:b] for k, v in t.items()}
        sliced["round_bits"] = (None if rounding_seed is None
                                else _rounding.bits(rounding_seed, b - a, offset + a, device))
        for name, value in math([z for _, _, z in parts], sliced, coefs).items():
            sliced[name].copy_(value)


def _graph(op, math, kind, all_names, names, dtypes, nseeds, size, rounding=False):
    key = (op, kind, names, dtypes, nseeds, size, rounding)
    fn = _graphs.get(key)
    if fn is None:
        chunk = _philox.CHUNK_FNS[kind]

        def body(firsts, keys, coefs, *tensors):
            zs = [chunk(firsts[i], keys[2 * i], keys[2 * i + 1], size) for i in range(nseeds)]
            t = dict.fromkeys(all_names)
            t.update(zip(names, tensors))
            t["round_bits"] = None
            if rounding:  # the rounding seed's words follow the noise seeds'
                t["round_bits"] = _philox._bits_chunk(firsts[nseeds], keys[2 * nseeds], keys[2 * nseeds + 1], size)
            c = [coefs[i] for i in range(coefs.shape[0])]
            for name, value in math(zs, t, c).items():
                t[name].copy_(value)

        # one code object per combination, so dynamo's per-code cache (and its recompile limit)
        # never mixes them: each compiles exactly once
        code = body.__code__.replace(co_name=f"zotune_{op}_{kind}_{'_'.join(names)}{'_sr' if rounding else ''}_{size}")
        body = types.FunctionType(code, body.__globals__, code.co_name, body.__defaults__, body.__closure__)
        fn = _graphs[key] = torch.compile(body, dynamic=False, fullgraph=True, options=_philox.INDUCTOR_OPTIONS)
    return fn


def run(op, math, tensors, seeds, kind, offset, coefs, impl, directions=None, rounding_seed=None):
    """Apply ``math`` to the flat contiguous ``tensors`` ({name: tensor or None}, "param" first).

    With ``directions`` (seed -> the whole tensor's z, for structured perturbations such as masks
    or low-rank products), z is ``directions(seed)`` instead of the noise, with eager arithmetic
    (and eager rounding bits). ``rounding_seed``: see the module docstring."""
    n = tensors["param"].numel()
    if directions is not None:
        if offset:
            raise ValueError("directions give whole tensors' z: offset must be 0")
        zs = [directions(s).reshape(-1).float() for s in seeds]
        device = tensors["param"].device
        for a in range(0, max(n, 1), _dispatch.EAGER_CHUNK):  # pieces bound the temporaries
            b = min(n, a + _dispatch.EAGER_CHUNK)
            sliced = {k: None if v is None else v[a:b] for k, v in tensors.items()}
            sliced["round_bits"] = None if rounding_seed is None else _rounding.bits(rounding_seed, b - a, a, device)
            for name, value in math([z[a:b] for z in zs], sliced, coefs).items():
                sliced[name].copy_(value)
        return
    if impl == "native" and rounding_seed is None and _native.run(op, tensors, seeds, kind, offset, coefs):
        return
    if impl != "compiled" or _philox._compile_failed:
        _eager_range(math, tensors, seeds, kind, offset, coefs, impl, 0, n, rounding_seed)
        return
    present = {k: v for k, v in tensors.items() if v is not None}
    names, device = tuple(present), tensors["param"].device
    dtypes = tuple(v.dtype for v in present.values())
    i64 = dict(dtype=torch.int64, device=device)
    key_seeds = (*seeds, rounding_seed) if rounding_seed is not None else seeds
    keys = torch.tensor([w for s in key_seeds for w in (s & 0xFFFFFFFF, s >> 32)], **i64)
    coef_t = torch.tensor(coefs, dtype=torch.float32, device=device)
    smallest = FUSED_SIZES[-1]
    # the ragged ends' noise: rademacher's eager signs are its compiled ones bit for bit and need no graph
    ragged_impl = "eager" if kind == "rademacher" else impl
    pos, end = offset, offset + n
    while pos < end:
        size = next((s for s in FUSED_SIZES if pos % s == 0 and pos + s <= end), None)
        if size is None:  # a ragged end: eager arithmetic up to the next aligned point
            stop = min(end, (pos // smallest + 1) * smallest)
            _eager_range(math, tensors, seeds, kind, offset, coefs, ragged_impl, pos - offset, stop - offset,
                         rounding_seed)
            pos = stop
            continue
        lo = pos - offset
        first = pos // PER_COUNTER[kind]
        firsts = torch.tensor([first] * len(seeds) + [pos], **i64)  # the rounding bits' counter: pos
        try:
            _graph(op, math, kind, tuple(tensors), names, dtypes, len(seeds), size, rounding_seed is not None)(
                firsts, keys, coef_t, *(v[lo : lo + size] for v in present.values()))
        except Exception as err:  # no C++ compiler, an unsupported platform, ...
            if _philox._compile_failed:
                raise
            _philox._compile_failed.append(f"{type(err).__name__}: {err}")
            warnings.warn(
                f"zotune.kernels: torch.compile of {op} failed ({_philox._compile_failed[0][:300]}); "
                "using the eager noise and arithmetic (slower, same numbers within the stated tolerance)",
                RuntimeWarning,
                stacklevel=3,
            )
            _eager_range(math, tensors, seeds, kind, offset, coefs, "eager", lo, n, rounding_seed)
            return
        pos += size
