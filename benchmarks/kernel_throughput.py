"""Throughput of every zotune.kernels op, in elements/s and in GB/s against a plain copy's.

    python benchmarks/kernel_throughput.py                              # CPU: 1M, 10M and 100M elements, 2 threads
    python benchmarks/kernel_throughput.py --sizes 1e6 --threads 1 --impl eager
    python benchmarks/kernel_throughput.py --device cuda --sizes 1e8    # the Triton kernels on a GPU

Each op runs on fp32 tensors for every noise kind: on the CPU with the native, compiled and eager paths
(forced through ZOTUNE_KERNELS), on a GPU with Triton; next to `torch.randn` + `add_` (a seeded
torch generator, what MeZO uses) measured in the same run. GB/s counts the bytes an op must move:
each fp32 tensor it reads and each it writes, once (`ops`). The reference bandwidth is measured, not
read from a spec sheet: a plain copy of one such tensor into another on the same device in the same
run, the most an elementwise op can be expected to reach there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import host
from zotune.noise import KINDS
from zotune.kernels import (
    adam_update_,
    momentum_update_,
    move_perturbation_,
    perturb_,
    perturb_rows,
    restore_and_update_,
)

MIN_SECONDS = 0.2  # each figure is timed over a batch of calls that takes at least this long


def ops(n: int, device: str) -> dict:
    """name -> (bytes moved per element, the op as a function of the noise kind), on fp32 tensors of n elements."""
    p, out, buf, m, v = (torch.zeros(n, device=device) for _ in range(5))
    rows = torch.arange(n // 1024, device=device)
    return {
        "perturb_": (8, lambda kind: perturb_(p, 1, 1e-3, kind=kind)),
        "perturb_ out=": (8, lambda kind: perturb_(p, 1, 1e-3, kind=kind, out=out)),
        "perturb_rows": (8, lambda kind: perturb_rows(p[: rows.numel() * 1024].view(-1, 1024), rows, 1, 1e-3,
                                                      kind=kind)),
        "restore_and_update_": (8, lambda kind: restore_and_update_(p, 1, 1e-3, 0.5, 1e-4, 0.0, kind=kind)),
        "move_perturbation_": (8, lambda kind: move_perturbation_(p, 1, 1e-3, 2, 1e-3, kind=kind)),
        "momentum_update_": (16, lambda kind: momentum_update_(p, buf, 1, 0.5, 1e-4, 0.0, 0.9, kind=kind)),
        "adam_update_": (24, lambda kind: adam_update_(p, m, v, 1, 0.5, 1e-4, 0.0, 0.9, 0.999, 1e-8, 1, kind=kind)),
    }


def rate(fn, n: int, sync) -> float:
    """Elements per second of `fn` over n elements: a warm-up call (compilation), then batches of calls,
    doubling, until one takes MIN_SECONDS; `sync` waits for the device."""
    fn()
    sync()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS:
            return n * calls / elapsed
        calls *= 2


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device == "cuda" else f"{platform.machine()} CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--impl", choices=["triton", "native", "compiled", "eager"],
                        help="only this implementation (default: native, compiled, eager on the CPU; triton on a GPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the largest size's figures to PATH as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    impls = [args.impl] if args.impl else ["triton"] if args.device == "cuda" else ["native", "compiled", "eager"]
    name = device_name(args.device)
    print(host.line())
    print(f"{name}, {args.threads} threads; M elements/s, GB/s and GB/s ÷ a plain copy's (higher is better)")
    figures = {}
    for n in (int(float(s)) for s in args.sizes.split(",")):
        generator = torch.Generator(args.device).manual_seed(0)
        p, q = torch.zeros(n, device=args.device), torch.zeros(n, device=args.device)
        baseline = rate(lambda: p.add_(torch.randn(n, generator=generator, device=args.device), alpha=1e-3), n, sync)
        copy_gbps = rate(lambda: q.copy_(p), n, sync) * 8 / 1e9
        print(f"\n{n:,} elements: torch.randn + add_ {baseline / 1e6:,.0f} M/s; copy {copy_gbps:,.1f} GB/s (reference)")
        print(f"  {'op':<31}{'impl':<10}" + "".join(f"{kind + ' M/s':>16}" for kind in KINDS)
              + f"{'gaussian4x ÷ randn':>20}" + "".join(f"{'÷ copy':>8}" for _ in KINDS))
        figures = {"host": host.describe(), "device": name, "elements": n, "copy_GBps": copy_gbps, "ops": {}}
        for impl in impls:
            os.environ["ZOTUNE_KERNELS"] = impl
            for op, (nbytes, fn) in ops(n, args.device).items():
                rates = {kind: rate(lambda k=kind: fn(k), n, sync) for kind in KINDS}
                gbps = {kind: r * nbytes / 1e9 for kind, r in rates.items()}
                figures["ops"].setdefault(op, {})[impl] = {k: {"GBps": g, "of_copy": g / copy_gbps}
                                                           for k, g in gbps.items()}
                print(f"  {op:<31}{impl:<10}" + "".join(f"{rates[k] / 1e6:>16,.0f}" for k in KINDS)
                      + f"{rates['gaussian4x'] / baseline:>20.2f}"
                      + "".join(f"{gbps[k] / copy_gbps:>8.2f}" for k in KINDS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
