"""The CPU noise built from C (`_native.c`) at first use: the fast path on x86 CPUs.

`library()` compiles `_native.c` once per (source, CPU capability, torch version, compiler) into
``$ZOTUNE_CACHE/native`` with the system C compiler (``$CC``, else ``cc``) and loads it: 0.5-3 s
cold, where torch.compile's graphs of the same noise took tens of seconds (issue 28). Its
normals call the Sleef functions in torch's own library that torch's vectorized ``log``, ``cos``
and ``sin`` call, with the compiled path's operations in its order, so its z equals the compiled
path's bit for bit on the same capability (and so stays within `zotune.noise`'s stated few ulp);
rademacher is exact. Where it cannot run (no AVX2, not x86, no compiler) `library()` is None, with
one warning when a compiler failed, and the CPU ops take the compiled path (`_dispatch.choose`).

`piece` fills one range of z. `run` applies `perturb_`, `move_perturbation_` or
`restore_and_update_` in one pass where the tensors are float32 without a master copy or stochastic
rounding (the default step's case), with its twin's arithmetic operation for operation, so its
results equal the twin fed by the same noise bit for bit; other cases return False and take the
twin. `_native.c` shares the work out over torch's intra-op threads (OpenMP, linked to the libgomp
torch loaded, so both use one pool of threads).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from zotune.paths import cache_root

SOURCE = Path(__file__).with_name("_native.c")
# Instruction sets by torch's CPU capability: the Sleef variants `_native.c` calls are the ones
# torch's own vectorized code of that capability calls.
ISA_FLAGS = {"AVX512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"), "AVX2": ("-mavx2",)}
# A compile that takes longer is given up on (the compiled path serves): it takes 0.5-3 s.
COMPILE_SECONDS = 120
# No fused multiply-add: every product rounded, as in the eager and compiled paths.
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fopenmp")
# the kinds as `_native.c` numbers them; also the Triton kernels' KIND constexpr (`_philox.noise_tile`)
KIND_ID = {"gaussian": 0, "rademacher": 1, "gaussian4x": 2}
_U64, _I64, _F32, _PTR, _INT = ctypes.c_uint64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
# exported function -> its argument types after (kind, seed..., start, n)
_SIGNATURES = {
    "zotune_noise": ((_U64,), (_PTR,)),
    "zotune_perturb": ((_U64,), (_PTR, _PTR, _F32)),
    "zotune_move_perturbation": ((_U64, _U64), (_PTR, _F32, _F32)),
    "zotune_restore_and_update": ((_U64,), (_PTR, _F32, _F32, _F32)),
}
FUSED_OPS = tuple(name.removeprefix("zotune_") for name in _SIGNATURES if name != "zotune_noise")  # `run`'s ops


def capability() -> str | None:
    """The instruction set `_native.c` is built for here, or None where it cannot run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    found = torch.backends.cpu.get_cpu_capability()
    return next((isa for isa in ISA_FLAGS if found.startswith(isa)), None)


def _command(isa: str, target: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return [os.environ.get("CC") or "cc", *FLAGS, *ISA_FLAGS[isa], "-o", str(target), str(SOURCE),
            f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]


def _build(isa: str) -> Path:
    """The shared library for ``isa``, compiled into the cache unless it is there already."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((_command(isa, Path("-")), torch.__version__)).encode())
    target = cache_root() / "native" / f"noise-{isa.lower()}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compiled beside the target and renamed onto it: processes building at once never load half a file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(_command(isa, built), check=True, capture_output=True, text=True, timeout=COMPILE_SECONDS)
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded `_native.c`, or None where it cannot run here (then the compiled path serves)."""
    isa = capability()
    if isa is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(isa)))
    except (OSError, subprocess.SubprocessError) as err:  # no compiler, a failed or hung compile, no cache
        detail = str(getattr(err, "stderr", None) or err)
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            detail = f"no C compiler {compiler!r} on PATH"
        warnings.warn(f"zotune.kernels: building the native CPU noise failed ({detail.strip()[:300]}); "
                      "using the torch.compile'd noise (same numbers, slower, longer first steps)",
                      RuntimeWarning, stacklevel=3)
        return None
    for name, (seeds, rest) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = [_INT, *seeds, _U64, _I64, *rest]
        fn.restype = None
    return lib


def piece(seed: int, numel: int, kind: str, start: int, device) -> torch.Tensor:
    """noise(seed, numel, kind, offset=start) as float32 on the CPU (``device`` must be the CPU)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    library().zotune_noise(KIND_ID[kind], seed, start, numel, out.data_ptr())
    return out


def run(op: str, tensors: dict, seeds: tuple, kind: str, offset: int, coefs: tuple) -> bool:
    """Apply ``op`` to the flat contiguous ``tensors`` in one native pass, if it is one this file runs
    and every tensor present is float32 without a master; False (nothing done) otherwise."""
    present = [t for t in tensors.values() if t is not None]
    if op not in FUSED_OPS or tensors.get("master") is not None or any(
            t.dtype != torch.float32 or t.device.type != "cpu" for t in present):
        return False
    param, n, lib = tensors["param"], tensors["param"].numel(), library()
    pointers = [param.data_ptr()]
    if op == "perturb":  # its output: out, or param itself in place
        pointers.append((tensors["out"] if tensors["out"] is not None else param).data_ptr())
    getattr(lib, f"zotune_{op}")(KIND_ID[kind], *seeds, offset, n, *pointers, *coefs)
    return True
