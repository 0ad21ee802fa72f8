"""Peak resident memory of each training mode, as a ratio to inference, each in its own process.

    python benchmarks/memory.py                          # GPT-2 124M from config, fp32, batch 8x128
    python benchmarks/memory.py --dtype bfloat16         # the same in bf16
    python benchmarks/memory.py --model gemma            # the real Gemma 3 270M, the quickstart's data and batch

Every mode trains all the weights (full-parameter) and imports the same libraries. Modes:

- inference: no-grad forwards with the loss, the baseline;
- zo-trainer: `ZOTrainer` with its defaults (out-of-place dual, master_weights auto), as a user runs it;
- zo-dual: the raw `ZOOptimizer` + `DualEngine`, the same step without the Trainer;
- zo-sequential: MeZO's in-place schedule with master_weights auto (an fp32 master per 16-bit weight);
- zo-sequential-none: in place without a master copy (MeZO's way; 16-bit only: the weights drift);
- zo-dual-offload: blocks offloaded (compute and offload device are both the CPU here, so RSS cannot
  show the saving; the residency tracker's compute-side parameter bytes are printed instead);
- fo-adamw, fo-adamw-ckpt: backprop with AdamW, without and with gradient checkpointing (the honest
  memory peer of ZO).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile

import torch
from datasets import Dataset  # noqa: F401 - every mode imports the same libraries
from transformers import GPT2Config, GPT2LMHeadModel, Trainer  # noqa: F401

import host
from separate import each_in_a_process
from raw_zo_step import zo_step_fn
from zotune.offload import BlockOffloader
from zotune.trainer import ZOConfig, ZOTrainer

MODES = ["inference", "zo-trainer", "zo-dual", "zo-sequential", "zo-sequential-none", "zo-dual-offload", "fo-adamw",
         "fo-adamw-ckpt"]
STEPS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gpt2(args):
    """GPT-2 from config, a ZOTrainer over random token rows, and its batch."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).to(DTYPES[args.dtype]).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def trainer(**zo):
        return ZOTrainer(model=model, args=_zo_args(args, **zo), train_dataset=rows)

    return model, {"input_ids": ids, "labels": ids}, trainer


def gemma(args):
    """The quickstart recipe, full-parameter (no adapter), and one of its batches."""
    from zotune.recipe import load_recipe
    from zotune.run import build_model, build_trainer

    recipe = load_recipe("quickstart", ["model.peft=null", f"model.dtype={args.dtype}", f"train.max_steps={STEPS}",
                                        f"train.output_dir={tempfile.mkdtemp()}", "data.eval=null"])
    model, tokenizer = build_model(recipe)
    base, _ = build_trainer(recipe, model, tokenizer)
    batch = base._prepare_inputs(next(iter(base.get_train_dataloader())))

    def trainer(**zo):
        built, _ = build_trainer(recipe, model, tokenizer)
        for key, value in zo.items():
            setattr(built.args, key, value)
        return built

    def loss(batch):
        return base.compute_loss(model, dict(batch))

    model.benchmark_loss = loss
    return model, batch, trainer


def _zo_args(args, **zo) -> ZOConfig:
    return ZOConfig(output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=args.batch,
                    report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, **zo)


def loss_of(model, batch):
    if hasattr(model, "benchmark_loss"):
        return model.benchmark_loss(batch)
    return model(**batch).loss


def run_mode(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    model, batch, trainer = (gemma if args.model == "gemma" else gpt2)(args)
    result = {}
    if mode == "inference":
        for _ in range(STEPS):
            with torch.no_grad():
                loss_of(model, batch).item()
    elif mode.startswith("fo-adamw"):
        model.train()
        if mode.endswith("ckpt"):
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(STEPS):
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif mode == "zo-trainer":
        trainer().train()
    elif args.model == "gemma":  # the recipe's loss needs its trainer: the schedules through it
        schedule, master = {"zo-dual": ("dual", "auto"), "zo-sequential": ("sequential", "auto"),
                            "zo-sequential-none": ("sequential", "none")}.get(mode, ("dual", "auto"))
        trainer(zo_schedule=schedule, zo_master_weights=master).train()
    else:
        if mode == "zo-dual-offload":
            offloader = BlockOffloader(model, "cpu")
        schedule = "sequential" if mode.startswith("zo-sequential") else "dual"
        master = "none" if mode.endswith("-none") else "auto"
        step, _ = zo_step_fn(model, batch, schedule, master_weights=master)
        for n in range(STEPS):
            step(n)
        if mode == "zo-dual-offload":
            t = offloader.tracker
            all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            result.update(compute_param_peak=t.peak, resident=t.resident, block=offloader.block_bytes(),
                          all_params=all_bytes)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "gemma"], default="gpt2")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=8, help="gpt2 only; gemma takes the quickstart's")
    parser.add_argument("--seq", type=int, default=128, help="gpt2 only")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = the 124M model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return

    modes = [m for m in MODES if not (m.endswith("-none") and args.dtype == "float32")
             and not (m == "zo-dual-offload" and args.model == "gemma")]
    results = each_in_a_process(__file__, "mode", modes, args)
    base = results["inference"]["peak_rss"]
    what = (f"GPT-2 {args.layers} layers from config, batch {args.batch}x{args.seq}" if args.model == "gpt2"
            else "Gemma 3 270M (real), the quickstart's data and batch")
    print(host.line(args.threads))
    print(f"{what}, {args.dtype}, full-parameter, CPU, {STEPS} steps per mode")
    print(f"{'mode':<20}{'peak RSS GiB':>14}{'/ inference':>13}")
    for mode, r in results.items():
        print(f"{mode:<20}{r['peak_rss'] / 2**30:>14.2f}{r['peak_rss'] / base:>13.3f}")
    if "zo-dual-offload" in results:
        off = results["zo-dual-offload"]
        bound = off["resident"] + 3 * off["block"]
        print(f"\noffload, parameter bytes on the compute side: peak {off['compute_param_peak'] / 2**20:.0f} MiB "
              f"(resident stages {off['resident'] / 2**20:.0f} MiB + blocks of {off['block'] / 2**20:.1f} MiB; "
              f"bound resident + 3 blocks = {bound / 2**20:.0f} MiB; "
              f"all parameters {off['all_params'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
