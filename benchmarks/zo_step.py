"""ZO step time divided by one no-grad forward, side by side in one process.

    python benchmarks/zo_step.py            # GPT-2 124M from config, fp32, batch 8x128, 2 threads
    python benchmarks/zo_step.py --device cuda --model opt-1.3b --dtype bfloat16 --offload   # on a GPU

Timings on a shared 2-core machine drift by tens of percent over minutes, so every ratio is taken
between ADJACENT measurements: each step is followed at once by a no-grad forward of its batch
(and, for the trainer, by a MeZO-style step on a copy of the model), and the figure is the median
of the per-step ratios. Measured in this order:

1. `ZOTrainer` with its defaults (out-of-place dual, its default noise), as a user runs it: STEPS steps, the
   steady state is the median of the last half; the warm-up (compiling the CPU kernels, first in
   this process) is the first steps' excess over it, reported apart;
2. the forward of the batch (B rows) and of the doubled batch (2B) that dual runs;
3. the raw `ZOOptimizer` for every schedule and noise kind, and a straightforward
   MeZO-style step (four regenerations of z with torch.normal under a re-seeded generator);
4. the breakdown of a raw dual step: the doubled forward (logits only), through the wrappers with
   plain copies of θ (splitting, joining, copying), with perturbed copies (the noise), the two
   halves' losses and the update pass.

With --offload, right after the first: `ZOTrainer` with its blocks offloaded to the host
(zo.offload cpu) on a copy of the model, its steady step against the resident trainer's. On a GPU
every figure waits for the device (torch.cuda.synchronize) before it reads the clock.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, GPT2Config, TrainerCallback

import host
from raw_zo_step import zo_step_fn
from zotune.dual import causal_lm_loss, double
from zotune.noise import KINDS
from zotune.settings import ZOSettings
from zotune.plan import KNOWN_CONFIGS, known_config
from zotune.trainer import ZOConfig, ZOTrainer

DEFAULT_NOISE = ZOSettings().perturbation
WARM_STEPS = 3  # the first steps build the native noise or compile the kernels


def sync() -> None:
    """Wait for the GPU's queued work, if this process ever used one."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clock(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired(fn, forward, repeats: int) -> tuple[float, float, float]:
    """(first call, median seconds, median of seconds ÷ the forward run right after it) over `repeats`."""
    first = clock(fn)
    times, ratios = [], []
    for _ in range(repeats):
        t = clock(fn)
        times.append(t)
        ratios.append(t / clock(forward))
    return first, statistics.median(times), statistics.median(ratios)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next `repeats`) in seconds."""
    first = clock(fn)
    return first, statistics.median(clock(fn) for _ in range(repeats))


def mezo_style_step(model, loss_fn, seed: int, eps: float, lr: float) -> None:
    """The MeZO reference loop: z regenerated with torch.normal four times per step."""
    params = [p for p in model.parameters() if p.requires_grad]

    def shift(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            p.add_(torch.normal(0, 1, size=p.shape, dtype=p.dtype, device=p.device), alpha=scale)

    with torch.no_grad():
        shift(eps)
        loss_plus = loss_fn()
        shift(-2 * eps)
        loss_minus = loss_fn()
        shift(eps)
        g = (loss_plus - loss_minus) / (2 * eps)
        shift(-lr * g)


class StepClock(TrainerCallback):
    """Times each trainer step, then (outside the step's time) a no-grad forward of the batch on the
    trained model and, given `mezo`, a MeZO-style step on a copy of it: adjacent figures per step."""

    def __init__(self, forward, mezo):
        self.forward, self.mezo = forward, mezo
        self.times, self.forwards, self.mezos, self._start = [], [], [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._start)
        training = model.training
        model.eval()
        self.forwards.append(clock(lambda: self.forward(model)))
        model.train(training)
        if self.mezo is not None:
            self.mezos.append(clock(self.mezo))


def trainer_steps(model, ids, batch, steps: int, offload: bool = False, perturbation: str = DEFAULT_NOISE) -> StepClock:
    """Per-step seconds of ZOTrainer with its defaults (only what the test needs is set; `offload`: its
    blocks on the host; `perturbation`: the noise), each with the adjacent forward and, resident, a
    MeZO-style step."""
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = ZOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=len(ids),
                    learning_rate=1e-7, report_to="none", save_strategy="no", use_cpu=ids.device.type == "cpu",
                    disable_tqdm=True, zo_offload="cpu" if offload else "none", zo_perturbation=perturbation)
    seeds = iter(range(10**9))

    def forward(m) -> float:
        with torch.no_grad():
            return m(**batch).loss.item()

    mezo = None
    if not offload:
        twin = copy.deepcopy(model)
        mezo = lambda: mezo_style_step(twin, lambda: forward(twin), next(seeds), 1e-3, 1e-7)  # noqa: E731
    clock_ = StepClock(forward, mezo)
    ZOTrainer(model=model, args=args, train_dataset=rows, callbacks=[clock_]).train()
    return clock_


def build(name: str, layers: int, width: int, dtype: str, device: str):
    """GPT-2 with `layers` layers of `width`, or a zotune.plan known config, from config with random weights."""
    config = GPT2Config(n_layer=layers, n_embd=width) if name == "gpt2" else known_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = the 124M model)")
    parser.add_argument("--width", type=int, default=768, help="GPT-2 width, a multiple of its 12 heads")
    parser.add_argument("--model", choices=["gpt2", *KNOWN_CONFIGS], default="gpt2",
                        help="gpt2 (with --layers) or a config `zotune plan --model` knows, e.g. opt-1.3b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=16, help="trainer steps; the steady state is their last half")
    parser.add_argument("--offload", action="store_true", help="also time the trainer with its blocks on the host")
    parser.add_argument("--json", metavar="PATH", help="also write the key figures to PATH as JSON")
    parser.add_argument("--perturbation", choices=KINDS, default=DEFAULT_NOISE,
                        help=f"the trainer's noise (default: its own, {DEFAULT_NOISE})")
    parser.add_argument("--trainer-only", action="store_true", help="stop after the trainer's figures")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    if args.steps < 2 * WARM_STEPS:
        parser.error(f"--steps must be at least {2 * WARM_STEPS}: the warm-up is the first {WARM_STEPS}")
    torch.set_num_threads(args.threads)
    print(host.line())

    model = build(args.model, args.layers, args.width, args.dtype, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids}
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    model_name = f"GPT-2 {args.layers}L d{args.width}" if args.model == "gpt2" else args.model
    print(f"{model_name}: {n_params / 1e6:.0f}M params, {args.dtype}, batch {args.batch}x{args.seq}, {where}")
    figures = {"host": host.describe(), "model": model_name, "params": n_params, "dtype": args.dtype, "device": where,
               "batch": f"{args.batch}x{args.seq}"}

    twin = copy.deepcopy(model) if args.offload else None  # before any engine wraps the model
    trained = trainer_steps(model, ids, batch, args.steps, perturbation=args.perturbation)
    steps, late = trained.times, slice(args.steps // 2, None)
    steady = statistics.median(steps[late])
    warmup = sum(t - steady for t in steps[:WARM_STEPS])
    step_ratios = [s / f for s, f in zip(steps[late], trained.forwards[late])]
    speedups = [m / s for m, s in zip(trained.mezos[late], steps[late])]
    mezo_ratios = [m / f for m, f in zip(trained.mezos[late], trained.forwards[late])]

    def loss_fn() -> float:
        with torch.no_grad():
            return model(**batch).loss.item()

    def doubled() -> float:
        with torch.no_grad():
            return model(**double(batch, args.batch)).loss.item()

    _, forward_2x, doubled_ratio = paired(doubled, loss_fn, args.repeats)
    spread = f"{min(step_ratios):.2f}-{max(step_ratios):.2f}"
    print(f"doubled batch: {forward_2x:.2f} s = {doubled_ratio:.2f} forwards of B rows")
    noise = (f"defaults (dual, {DEFAULT_NOISE})" if args.perturbation == DEFAULT_NOISE
             else f"defaults but the noise (dual, {args.perturbation})")
    print(f"\nZOTrainer, {noise}: steady step {steady:.2f} s = "
          f"{statistics.median(step_ratios):.2f} "
          f"forwards (median over steps {args.steps // 2 + 1}-{args.steps} of step ÷ the forward right after it; "
          f"range {spread}); "
          f"vs a MeZO-style step after each: {statistics.median(speedups):.2f}x faster "
          f"(range {min(speedups):.2f}-{max(speedups):.2f}); warm-up {warmup:.1f} s over the first {WARM_STEPS} steps")
    figures.update(trainer_step_s=steady, trainer_over_forward=statistics.median(step_ratios),
                   trainer_vs_mezo=statistics.median(speedups), warmup_s=warmup)
    if twin is not None:
        offloaded = trainer_steps(twin, ids, batch, args.steps, offload=True)
        off_steady = statistics.median(offloaded.times[late])
        off_ratio = statistics.median(s / f for s, f in zip(offloaded.times[late], offloaded.forwards[late]))
        print(f"ZOTrainer, blocks offloaded to the host: steady step {off_steady:.2f} s = {off_steady / steady:.2f}x "
              f"the resident trainer's; {off_ratio:.2f} offloaded forwards")
        figures.update(offloaded_step_s=off_steady, offloaded_over_resident=off_steady / steady)
        del twin, offloaded
    if args.trainer_only:
        print(f"MeZO-style step beside the trainer: {statistics.median(mezo_ratios):.2f} forwards")
        return

    mezo = statistics.median(mezo_ratios)
    print(f"\n{'step (each ratio: median of step ÷ next forward)':<50}{'seconds':>9}{'/ forward':>11}{'first':>9}")
    print(f"{'MeZO-style (torch.normal x4), beside the trainer':<50}{statistics.median(trained.mezos[late]):>9.2f}"
          f"{mezo:>11.2f}")
    print(f"{'ZOTrainer, defaults':<50}{steady:>9.2f}{statistics.median(step_ratios):>11.2f}{steps[0]:>9.2f}")
    dual_step = None
    for perturbation in KINDS:
        for schedule in ("dual", "sequential", "fused"):
            step, engine = zo_step_fn(model, batch, schedule, perturbation)
            counter = iter(range(10**9))
            first, t, ratio = paired(lambda: step(next(counter)), loss_fn, args.repeats)
            if engine is not None:
                if (schedule, perturbation) == ("dual", DEFAULT_NOISE):
                    dual_step = (step, engine, t)
                else:
                    engine.remove()
            label = f"raw {schedule}, {perturbation}"
            noise_note = "" if perturbation == DEFAULT_NOISE else " (noise switched)"
            print(f"{label:<50}{t:>9.2f}{ratio:>11.2f}{first:>9.2f}   vs MeZO-style {mezo / ratio:.2f}x{noise_note}")
            figures[f"{label}_over_forward"] = ratio

    step, engine, total = dual_step
    opt = step.optimizer
    inputs = {"input_ids": ids}

    def forward_through(direction) -> torch.Tensor:
        with torch.no_grad(), engine.dual_forward(args.batch, direction):
            return model(**double(inputs, args.batch)).logits

    def copies_only() -> None:
        """The wrapped forward with every perturbed copy a plain copy of θ: splitting, joining, copying."""
        copies = opt.placement
        noisy = copies.perturbed, copies.perturbed_range, copies.reflect
        copies.perturbed = lambda name, p, at, out: out.copy_(p.data)
        copies.perturbed_range = lambda name, p, lo, hi, at, out: out.copy_(p.data[lo:hi])
        copies.reflect = lambda p, copy, index=...: copy
        try:
            forward_through((0, 0))
        finally:
            copies.perturbed, copies.perturbed_range, copies.reflect = noisy

    def logits_2x() -> torch.Tensor:
        with torch.no_grad():
            return model(**double(inputs, args.batch)).logits

    _, forward = timed(loss_fn, args.repeats)
    _, plain = timed(logits_2x, args.repeats)
    _, copied = timed(copies_only, args.repeats)
    _, perturbed = timed(lambda: forward_through((0, 0)), args.repeats)
    logits = logits_2x()
    _, losses = timed(lambda: [causal_lm_loss(logits[h * args.batch:(h + 1) * args.batch], ids) for h in (0, 1)],
                      args.repeats)
    _, update = timed(lambda: opt.placement.apply([1e-3], 0), args.repeats)
    print(f"\nbreakdown of a raw dual step ({total:.2f} s), in forwards of B rows, each part timed on its own:")
    for label, t in (("doubled forward, logits only", plain),
                     ("+ through the wrappers, copies of θ (no noise)", copied - plain),
                     ("+ noise of the perturbed copies", perturbed - copied),
                     ("the two halves' losses", losses), ("update pass", update),
                     ("rest (bookkeeping, timing noise)", total - perturbed - losses - update)):
        print(f"  {label:<52}{t:>7.2f} s{t / forward:>7.2f}")
    print(f"ZOTrainer's own work beyond the raw step: {steady - total:.2f} s = "
          f"{(steady - total) / forward:.2f} forwards")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
