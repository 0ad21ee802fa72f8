"""ZO step time divided by one no-grad forward, side by side in one run.

    python benchmarks/zo_step.py            # GPT-2 124M from config, fp32, batch 8x128, 2 threads

Prints the ratio for each zotune schedule and noise, and for a straightforward MeZO-style
step (four regenerations of z with torch.normal under a re-seeded global generator), all
measured in the same process. Timings on a shared machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from zotune.optim import ZOOptimizer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, where there is any)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mezo_style_step(model, loss_fn, seed: int, eps: float, lr: float) -> None:
    """The MeZO reference loop: z regenerated with torch.normal four times per step."""
    params = [p for p in model.parameters() if p.requires_grad]

    def shift(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            p.add_(torch.normal(0, 1, size=p.shape, dtype=p.dtype), alpha=scale)

    with torch.no_grad():
        shift(eps)
        loss_plus = loss_fn()
        shift(-2 * eps)
        loss_minus = loss_fn()
        shift(eps)
        g = (loss_plus - loss_minus) / (2 * eps)
        shift(-lr * g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = the 124M model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))

    def loss_fn() -> float:
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    forward = timed(loss_fn, args.repeats)
    print(f"GPT-2 {n_params / 1e6:.0f}M params, fp32, batch {args.batch}x{args.seq}, {args.threads} threads")
    print(f"no-grad forward: {forward:.2f} s")
    print(f"{'step':<34}{'seconds':>9}{'/ forward':>11}")

    mezo = timed(lambda: mezo_style_step(model, loss_fn, 0, 1e-3, 1e-7), args.repeats)
    print(f"{'MeZO-style (torch.normal x4)':<34}{mezo:>9.2f}{mezo / forward:>11.2f}")
    for perturbation in ("gaussian", "rademacher"):
        for schedule in ("sequential", "fused"):
            opt = ZOOptimizer(model.named_parameters(), lr=1e-7, eps=1e-3, perturbation=perturbation, schedule=schedule)
            counter = iter(range(10**9))

            def step() -> None:
                opt.estimate(loss_fn, next(counter))
                opt.step()

            t = timed(step, args.repeats)
            label = f"zotune {schedule}, {perturbation}"
            noise_note = "" if perturbation == "gaussian" else " (noise switched: not comparable)"
            print(f"{label:<34}{t:>9.2f}{t / forward:>11.2f}   vs MeZO-style {mezo / t:.2f}x{noise_note}")


if __name__ == "__main__":
    main()
