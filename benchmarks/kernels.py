"""Elements per second of every zotune.kernels op on each CPU implementation.

    python benchmarks/kernels.py                    # 1M, 10M and 100M elements, 2 threads
    python benchmarks/kernels.py --sizes 1e6 --threads 1

Each op runs on an fp32 tensor for both noises, with the compiled and the eager paths
(forced through ZOTUNE_KERNELS), next to `torch.randn` + `add_` (a seeded torch generator,
what MeZO uses) measured in the same run. On a CUDA machine add `--device cuda` to time
the Triton kernels instead and compare with the card's memory bandwidth: an op reads and
writes each element once (8 bytes per fp32 element; more with a master copy or state).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from zotune.kernels import adam_update_, lazy_update_and_perturb_, momentum_update_, perturb_, restore_and_update_


def ops(n: int, device: str) -> dict:
    p = torch.zeros(n, device=device)
    buf, m, v = (torch.zeros(n, device=device) for _ in range(3))
    return {
        "perturb_": lambda kind: perturb_(p, 1, 1e-3, kind=kind),
        "restore_and_update_": lambda kind: restore_and_update_(p, 1, 1e-3, 0.5, 1e-4, 0.0, kind=kind),
        "lazy_update_and_perturb_": lambda kind: lazy_update_and_perturb_(p, 1, 1e-3, 2, 1e-3, kind=kind),
        "momentum_update_": lambda kind: momentum_update_(p, buf, 1, 0.5, 1e-4, 0.0, 0.9, kind=kind),
        "adam_update_": lambda kind: adam_update_(p, m, v, 1, 0.5, 1e-4, 0.0, 0.9, 0.999, 1e-8, 1, kind=kind),
    }


def rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up and compilation
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated element counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    impls = ["triton"] if args.device == "cuda" else ["compiled", "eager"]
    print(f"{args.device}, {args.threads} threads; M elements/s (higher is better)")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        repeats = max(1, int(2e7 // n))
        generator = torch.Generator(args.device).manual_seed(0)
        p = torch.zeros(n, device=args.device)
        baseline = rate(lambda: p.add_(torch.randn(n, generator=generator, device=args.device), alpha=1e-3), n, repeats)
        print(f"\n{n:,} elements: torch.randn + add_ {baseline / 1e6:,.0f} M/s")
        print(f"  {'op':<26}{'impl':<10}{'gaussian':>10}{'rademacher':>12}{'gauss/randn':>13}")
        for impl in impls:
            os.environ["ZOTUNE_KERNELS"] = impl
            for name, op in ops(n, args.device).items():
                gauss, rad = (rate(lambda k=kind: op(k), n, repeats) for kind in ("gaussian", "rademacher"))
                print(f"  {name:<26}{impl:<10}{gauss / 1e6:>10,.0f}{rad / 1e6:>12,.0f}{gauss / baseline:>13.2f}")


if __name__ == "__main__":
    main()
