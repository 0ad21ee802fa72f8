"""Peak resident memory of each training mode, as a ratio to inference, each in its own process.

    python benchmarks/memory.py            # GPT-2 124M from config, fp32, batch 8x128, CPU

Modes: inference (no-grad forward with the loss), inference on the doubled batch that a
dual forward runs (for reference), ZO sequential, ZO dual, ZO dual with
the blocks offloaded (compute and offload device are both the CPU here, so RSS cannot
show the saving; the residency tracker's compute-side parameter bytes are printed
instead), and first-order AdamW. Then, in one process, the step time of dual against
sequential for both noise kinds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from separate import each_in_a_process
from zo_steps import zo_step_fn
from zotune.offload import BlockOffloader

MODES = ["inference", "inference-2x", "zo-sequential", "zo-dual", "zo-dual-offload", "fo-adamw"]
STEPS = 3


def build(args):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    return model, {"input_ids": ids, "labels": ids}


def run_mode(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    model, batch = build(args)
    result = {}
    if mode == "inference-2x":  # the doubled batch a dual forward runs, for reference
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    if mode.startswith("inference"):
        for _ in range(STEPS):
            with torch.no_grad():
                model(**batch).loss.item()
    elif mode == "fo-adamw":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(STEPS):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if mode == "zo-dual-offload":
            offloader = BlockOffloader(model, "cpu")
        step, _ = zo_step_fn(model, batch, "sequential" if mode == "zo-sequential" else "dual")
        for n in range(STEPS):
            step(n)
        if mode == "zo-dual-offload":
            t = offloader.tracker
            all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            result.update(compute_param_peak=t.peak, resident=t.resident, block=offloader.block_bytes(),
                          all_params=all_bytes)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def timing(args) -> None:
    torch.set_num_threads(args.threads)
    model, batch = build(args)
    variants = {"sequential": ("sequential", False), "dual": ("dual", False), "dual lazy": ("dual", True)}
    print(f"\nstep time against sequential (same process, median of {args.repeats})")
    print(f"{'noise':<12}" + "".join(f"{name + ' s':>14}" for name in variants) + f"{'dual / seq':>12}{'lazy / seq':>12}")
    for perturbation in ("gaussian", "rademacher"):
        times = {}
        for name, (schedule, lazy) in variants.items():
            step, engine = zo_step_fn(model, batch, schedule, perturbation, lazy)
            step(0)  # warm-up
            runs = []
            for n in range(1, args.repeats + 1):
                start = time.perf_counter()
                step(n)
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
            if engine is not None:
                engine.remove()
        seq = times["sequential"]
        print(f"{perturbation:<12}" + "".join(f"{t:>14.2f}" for t in times.values())
              + f"{times['dual'] / seq:>12.2f}{times['dual lazy'] / seq:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = the 124M model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return

    results = each_in_a_process(__file__, "mode", MODES, args, not_forwarded=("repeats",))
    base = results["inference"]["peak_rss"]
    print(f"GPT-2 {args.layers} layers from config, fp32, batch {args.batch}x{args.seq}, CPU, {STEPS} steps per mode")
    print(f"{'mode':<18}{'peak RSS GiB':>14}{'/ inference':>13}")
    for mode, r in results.items():
        print(f"{mode:<18}{r['peak_rss'] / 2**30:>14.2f}{r['peak_rss'] / base:>13.2f}")
    off = results["zo-dual-offload"]
    bound = off["resident"] + 3 * off["block"]
    print(f"\noffload, parameter bytes on the compute side: peak {off['compute_param_peak'] / 2**20:.0f} MiB "
          f"(resident stages {off['resident'] / 2**20:.0f} MiB + blocks of {off['block'] / 2**20:.1f} MiB; "
          f"bound resident + 3 blocks = {bound / 2**20:.0f} MiB; all parameters {off['all_params'] / 2**20:.0f} MiB)")
    timing(args)


if __name__ == "__main__":
    main()
