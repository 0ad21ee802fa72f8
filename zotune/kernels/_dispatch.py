"""What every op shares: choosing an implementation, argument checks, flat views, lazy Triton.

Implementations (DESIGN §2):

- ``triton``: the fused kernel. The default for CUDA tensors when triton is installed. Forcing
  it on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (how the tests run it).
- ``native``: `_native`'s C (built at first use): its noise is bit-equal to the compiled path's;
  `perturb_`, `move_perturbation_` and `restore_and_update_` on float32 tensors without a
  master run in one pass with the twin's arithmetic, every other case is the twin fed by that
  noise over cache-sized pieces. The default for CPU tensors where it builds (x86 with AVX2 or
  AVX-512 and a C compiler).
- ``compiled``: the op's PyTorch twin, ``torch.compile``'d whole (Philox noise + arithmetic +
  stores, one fused graph per aligned piece, see `_fused`); ragged ends use the compiled Philox
  of `_philox` with eager arithmetic. The default for CPU tensors where ``native`` cannot run.
- ``eager``: the op's PyTorch twin fed by `zotune.noise`; the reference, runs anywhere.

``ZOTUNE_KERNELS=triton|native|compiled|eager`` forces one (read at every call).

Nothing here imports triton: `triton_jit` defers both the import and the decoration to the
first launch, so importing `zotune.kernels` stays cheap and never touches a GPU driver.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import importlib.util
import operator
import os
import struct
from typing import TYPE_CHECKING

import torch

from zotune.kernels import _native
from zotune.noise import KINDS

if TYPE_CHECKING:
    import triton.language as tl

IMPLS = ("triton", "native", "compiled", "eager")
ENV = "ZOTUNE_KERNELS"
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements per piece in the PyTorch paths: CHUNK is also the fixed size of one call of the
# compiled Philox; eager pieces are larger, as per-call overhead dominates eager Philox; native
# pieces (the cases `_native.run` does not take in one pass) keep the eager arithmetic on them in
# the core's cache (1 << 16 ran a float32 perturb_ that way fastest of 2**15 .. 2**20 on a Zen 4,
# 2 threads). Pieces end on multiples of their size in the global index,
# so a piece never spans two compiled chunks. Multiples of 128, so a rademacher counter is never
# split. Results do not depend on them.
CHUNK = 1 << 15
NATIVE_CHUNK = 1 << 16
EAGER_CHUNK = 1 << 18

# Triton tile: ROWS x 128 elements, one row per Philox counter of the rademacher stream.
ROWS = 8


# ---------------------------------------------------------------------------------------
# choosing


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # finds it without importing it


def choose(device: torch.device, directions=None) -> str:
    """The implementation an op uses for tensors on ``device``; given ``directions``, the eager twin."""
    if directions is not None:
        return "eager"
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{ENV}={forced!r}; expected one of {', '.join(IMPLS)}")
        if forced == "triton":
            if not triton_available():
                raise RuntimeError(f"{ENV}=triton but triton is not installed")
            if device.type != "cuda" and not interpreting():
                raise RuntimeError(
                    f"{ENV}=triton on {device.type} tensors needs TRITON_INTERPRET=1, set before triton is imported"
                )
        if forced == "native" and _native.library() is None:
            raise RuntimeError(f"{ENV}=native but the native noise cannot run here (it needs an x86 CPU with AVX2 "
                               "or AVX-512 and a C compiler)")
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return "native" if _native.library() is not None else "compiled"
    return "eager"


# ---------------------------------------------------------------------------------------
# arguments


def f32(x) -> float:
    """``x`` rounded to float32, as a Python float.

    Every scalar coefficient is computed in double on the host and rounded once here, so the
    twin (where torch rounds a Python scalar to float32 for a float32 tensor), the compiled
    path and the kernel (float32 arguments) all multiply by the same number.
    """
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def check(param: torch.Tensor, seed, kind: str, offset, master=None, **state) -> tuple[int, int]:
    """Validate an op's arguments; returns (seed, offset) as ints."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {KINDS}")
    seed, offset = operator.index(seed), operator.index(offset)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if offset < 0 or offset + param.numel() >= 1 << 63:
        raise ValueError(f"offset must be >= 0 and offset + numel < 2**63, got offset={offset}")
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"param must be float32, bfloat16 or float16, got {param.dtype}")
    if master is not None:
        if master.dtype != torch.float32:
            raise TypeError(f"master must be float32, got {master.dtype}")
        state = {"master": master, **state}
    for name, t in state.items():
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(
                f"{name} must match param: shape {tuple(t.shape)} vs {tuple(param.shape)}, "
                f"device {t.device} vs {param.device}"
            )
    return seed, offset


@contextlib.contextmanager
def flat(*tensors):
    """1-D contiguous views of ``tensors`` (None stays None), in row-major logical order.

    A non-contiguous tensor is worked on as a contiguous copy and written back on exit.
    Parameters are almost always contiguous, and a copy keeps every implementation on the
    same simple flat-index code; a strided kernel would save the copy for rare views only.
    """
    views, copies = [], []
    for t in tensors:
        if t is None or t.is_contiguous():
            views.append(None if t is None else t.view(-1))
        else:
            copy = t.contiguous().view(-1)
            views.append(copy)
            copies.append((t, copy))
    yield views
    for t, copy in copies:
        t.copy_(copy.view(t.shape))


# ---------------------------------------------------------------------------------------
# lazy Triton


class _LazyJIT:
    """A function that becomes ``triton.jit(fn)`` on first use.

    Until then nothing imports triton. On first use the defining module's global ``tl``
    is bound to ``triton.language`` (the op modules import it only under TYPE_CHECKING),
    and every other lazy function the body names is materialised and bound in its place,
    because Triton resolves callees from the function's globals.
    """

    def __init__(self, fn, jit_kwargs):
        self.fn, self.jit_kwargs, self._jitted = fn, jit_kwargs, None
        functools.update_wrapper(self, fn)

    def materialize(self):
        if self._jitted is None:
            import triton
            import triton.language as tl

            scope = self.fn.__globals__
            scope["tl"] = tl
            for name in {ins.argval for ins in dis.get_instructions(self.fn) if ins.opname == "LOAD_GLOBAL"}:
                dep = scope.get(name)
                if isinstance(dep, _LazyJIT):
                    scope[name] = dep.materialize()
            self._jitted = triton.jit(self.fn, **self.jit_kwargs)
        return self._jitted

    def __getitem__(self, grid):
        return self.materialize()[grid]


def triton_jit(fn=None, **jit_kwargs):
    """``@triton.jit`` (with its keyword arguments), deferred to the first launch."""
    if fn is None:
        return lambda f: _LazyJIT(f, jit_kwargs)
    return _LazyJIT(fn, jit_kwargs)


def launch(kernel, numel: int, offset: int, *args, **constexprs) -> None:
    """Launch an op kernel over the ROWS x 128 tiles covering global elements [offset, offset+numel).

    Tiles are aligned to 128 in the global index (see `tile`), so the first one may start
    before ``offset``; those lanes are masked.
    """
    if numel == 0:
        return
    per_program = ROWS * 128
    grid = (-(-(offset % 128 + numel) // per_program),)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        # No fused multiply-add: the kernel rounds every product like the PyTorch twin does.
        # The interpreter drops launch options it does not know.
        kernel[grid](*args, numel, offset, **constexprs, ROWS=ROWS, num_warps=4, enable_fp_fusion=False)


@triton_jit
def tile(n, offset, ROWS: tl.constexpr):
    """This program's rows ([ROWS] int64, row r = global elements 128*r .. 128*r + 127), and the
    flat tensor indices and mask of its elements ([ROWS, 128])."""
    pid = tl.program_id(0).to(tl.int64)
    offset = offset.to(tl.int64)
    rows = offset // 128 + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    idx = rows[:, None] * 128 + tl.arange(0, 128)[None, :] - offset
    return rows, idx, (idx >= 0) & (idx < n)


@triton_jit
def store(ptr, x, mask):
    """Store float32 ``x`` to ``ptr``'s dtype, rounding to nearest even like torch.

    bfloat16 is rounded by hand: the interpreter truncates float32 -> bfloat16 casts, and the
    bit trick is what the GPU's cvt.rn does, so both match torch bit for bit.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        y = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, x.to(tl.bfloat16), y)  # the carry would turn some NaNs into -0
    else:
        y = x.to(ptr.dtype.element_ty)
    tl.store(ptr, y, mask=mask)


