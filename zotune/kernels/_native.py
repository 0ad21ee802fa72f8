"""The CPU noise built from C (`_native.c`) at first use: the fast path on x86 CPUs.

`library()` compiles `_native.c` once per (source, CPU capability, torch version, compiler) into
``$ZOTUNE_CACHE/native`` with the system C compiler (``$CC``, else ``cc``) and loads it: under a
second cold, where torch.compile's graphs of the same noise took tens of seconds (issue 28). Its
gaussian calls the Sleef functions in torch's own library that torch's vectorized ``log`` and
``cos`` call, with the compiled path's operations in its order, so its z equals the compiled
path's bit for bit on the same capability (and so stays within `zotune.noise`'s stated few ulp);
rademacher is exact. Where it cannot run (no AVX2, not x86, no compiler) `library()` is None, with
one warning when a compiler failed, and the CPU ops take the compiled path (`_dispatch.choose`).

`piece` fills one range of z; `_native.c` shares it out over torch's intra-op threads (OpenMP, linked
to the libgomp torch loaded, so both use one pool of threads).
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
# No fused multiply-add: every product rounded, as in the eager and compiled paths.
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fopenmp")


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
        subprocess.run(_command(isa, built), check=True, capture_output=True, text=True)
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
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            detail = f"no C compiler {compiler!r} on PATH"
        warnings.warn(f"zotune.kernels: building the native CPU noise failed ({detail.strip()[:300]}); "
                      "using the torch.compile'd noise (same numbers, slower, longer first steps)",
                      RuntimeWarning, stacklevel=3)
        return None
    for name in ("zotune_gaussian", "zotune_gaussian4x", "zotune_rademacher"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    return lib


def piece(seed: int, numel: int, kind: str, start: int, device) -> torch.Tensor:
    """noise(seed, numel, kind, offset=start) as float32 on the CPU (``device`` must be the CPU)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    getattr(library(), f"zotune_{kind}")(seed, start, numel, out.data_ptr())
    return out
