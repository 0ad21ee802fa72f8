"""Memory and time of every ZO method relative to ZO-SGD, each method in its own process.

    python benchmarks/methods.py           # GPT-2 124M from config, fp32, batch 8x128, CPU

Full-parameter training (the case where optimizer state costs most), fused schedule (the one
schedule every method accepts), Gaussian noise. For each method: the optimizer state it
keeps (bytes, exact), the peak resident memory of the process, and the median step time
after a warm-up step, each divided by ZO-SGD's from the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import host
from separate import each_in_a_process
from raw_zo_step import zo_step_fn

METHODS = {  # label -> (rule, estimator, num_directions)
    "sgd": ("sgd", "spsa", 1),
    "spsa one-sided": ("sgd", {"name": "spsa", "sided": "one"}, 1),
    "n-spsa q=4": ("sgd", "spsa", 4),
    "momentum": ("momentum", "spsa", 1),
    "adam": ("adam", "spsa", 1),
    "sign": ("sign", "spsa", 1),
    "conservative": ("conservative", "spsa", 1),
    "sparse random": ("sgd", {"name": "sparse", "density": 0.1}, 1),
    "sparse magnitude": ("sgd", {"name": "sparse", "density": 0.1, "mask": "magnitude"}, 1),
    "hizoo": ("sgd", "hizoo", 1),
    "lowrank": ("sgd", "lowrank", 1),
    "guided": ("sgd", {"name": "guided", "history": 8}, 1),  # its state fills over its first 8 steps
    "fzoos": ("sgd", "fzoos", 1),  # 32 features: 32 noise passes to fit, 32 to apply
}


def run_method(label: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    rule, estimator, q = METHODS[label]
    forwards = 0
    original = model.forward

    def counted(*a, **kw):
        nonlocal forwards
        forwards += 1
        return original(*a, **kw)

    model.forward = counted
    step, _ = zo_step_fn(model, {"input_ids": ids, "labels": ids}, "fused", rule=rule, estimator=estimator,
                         num_directions=q)
    times = []
    for n in range(args.steps):
        start = time.perf_counter()
        step(n)
        times.append(time.perf_counter() - start)
    state = sum(t.numel() * t.element_size() for s in step.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return {"state": state, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": statistics.median(times[1:]), "forwards": forwards / args.steps,
            "params": sum(p.numel() * p.element_size() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = the 124M model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)} "
                        "(sgd first: the others are divided by it)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args)))
        return

    labels = args.methods.split(",")
    unknown = [label for label in labels if label not in METHODS]
    if unknown or labels[0] != "sgd":
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}" if unknown else
                     "--methods: sgd comes first (the others are divided by it)")
    results = each_in_a_process(__file__, "method", labels, args, not_forwarded=("methods",))
    base = results["sgd"]
    print(host.line(args.threads))
    print(f"GPT-2 {args.layers} layers from config ({base['params'] / 2**20:.0f} MiB of fp32 weights, all trained), "
          f"batch {args.batch}x{args.seq}, fused schedule, gaussian, CPU, {args.threads} threads, "
          f"median of {args.steps - 1} steps")
    print(f"{'method':<18}{'state MiB':>10}{'state/weights':>15}{'peak RSS GiB':>14}{'RSS / sgd':>11}"
          f"{'forwards':>10}{'step s':>8}{'time / sgd':>12}")
    for label, r in results.items():
        print(f"{label:<18}{r['state'] / 2**20:>10.0f}{r['state'] / r['params']:>15.2f}{r['peak_rss'] / 2**30:>14.2f}"
              f"{r['peak_rss'] / base['peak_rss']:>11.2f}{r['forwards']:>10.1f}{r['step_s']:>8.2f}"
              f"{r['step_s'] / base['step_s']:>12.2f}")


if __name__ == "__main__":
    main()
