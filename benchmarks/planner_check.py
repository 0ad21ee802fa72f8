"""Check `zotune.plan` against measured memory on small CPU models, and write the planner's table.

    python benchmarks/planner_check.py     # about a minute on 2 cores
    python benchmarks/planner_check.py --case bf16   # only the cases whose name contains "bf16"

Each case runs in a fresh subprocess: it builds the model from its config, then runs real
ZO steps (`ZOOptimizer` with the case's `master_weights`; for dual the `DualEngine` and
`call_halves` the trainer uses: one no-grad forward of the doubled batch, each module run on
perturbed copies of its own parameters made for its call, then each half's loss; rademacher
noise, eager kernels). Measured, from /proc/self/status:
- weights: the RSS increase of building the model and the optimizer (the fp32 master copies
  of 16-bit weights where `zo.master_weights` keeps them: auto under the in-place sequential
  schedule, fp32 always), against the planned parameter + master + buffer bytes;
- step: the peak RSS of a step above the RSS before it (VmHWM, reset through
  /proc/self/clear_refs after a warm-up step), against the planned activation peak plus the
  planned scratch (under dual, the largest module's perturbed copies; `zotune.scratch`). The
  "scratch" case has a tiny batch, so that its step peak is mostly the scratch.
glibc is told to serve every allocation over 64 KiB with mmap, so freed tensors leave the
RSS at once and the peak follows the live bytes, as a caching GPU allocator's would not.
Forwards pass use_cache=False, as the planner assumes, except in the case marked
"use_cache": transformers' default, which keeps every layer's k and v.

Writes benchmarks/results/planner_check.txt and benchmarks/results/plan_table.md (the
planner's compute-device peak for OPT and Llama 3 next to ZO2's published GPU figures).

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/planner_check.py --recipe quickstart train.max_steps=2

checks `zotune plan RECIPE` against the recipe itself, as `zotune train` builds it (prints only):
the RSS once the model, data and trainer are built (libraries, weights, tokenizer, data: the
baseline the planner leaves out), then the peak above it of the evaluation (when the recipe has
eval data) and of training's steps, against the planned evaluation working set and the planned
step (activations + scratch + master copies, which the optimizer makes at the first step).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMMAND = "python benchmarks/planner_check.py"

SMALL_LLAMA = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1408, vocab_size=2048, max_position_embeddings=1024)
GPT2_BIG_VOCAB = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=50257)
# a llama whose MLP matrices (4096 x 1024 = 2**22 elements, copied whole) are its largest modules
SCRATCH_LLAMA = dict(SMALL_LLAMA, hidden_size=1024, num_hidden_layers=2, intermediate_size=4096)
# name -> (model_type, config fields, batch B, seq T, attention, schedule, dtype, use_cache, master_weights)
CASES = {
    "gpt2 4L d256 V50257": ("gpt2", GPT2_BIG_VOCAB, 2, 256, "sdpa", "dual", "float32", False, "auto"),
    "gpt2 4L d256 V50257 eager": ("gpt2", GPT2_BIG_VOCAB, 2, 512, "eager", "dual", "float32", False, "auto"),
    "gpt2 4L d768 V2048": ("gpt2", dict(n_layer=4, n_embd=768, n_head=12, vocab_size=2048), 2, 512, "sdpa", "dual",
                           "float32", False, "auto"),
    "opt 4L d512 V2048 eager": ("opt", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                            ffn_dim=2048, vocab_size=2048, word_embed_proj_dim=512), 2, 512, "eager",
                                "dual", "float32", False, "auto"),
    "llama 4L d512 V2048": ("llama", SMALL_LLAMA, 2, 512, "sdpa", "dual", "float32", False, "auto"),
    "llama 4L d512 V2048 eager": ("llama", SMALL_LLAMA, 2, 512, "eager", "dual", "float32", False, "auto"),
    "llama 4L d512 V2048 eager seq": ("llama", SMALL_LLAMA, 2, 512, "eager", "sequential", "float32", False, "auto"),
    "llama 4L d512 V32000 bf16": ("llama", dict(SMALL_LLAMA, vocab_size=32000), 2, 256, "sdpa", "dual", "bfloat16",
                                  False, "auto"),
    "llama 4L d512 V32000 bf16 fp32": ("llama", dict(SMALL_LLAMA, vocab_size=32000), 2, 256, "sdpa", "dual",
                                       "bfloat16", False, "fp32"),
    "llama 4L d512 V32000 bf16 seq": ("llama", dict(SMALL_LLAMA, vocab_size=32000), 2, 256, "sdpa", "sequential",
                                      "bfloat16", False, "auto"),
    "llama 2L d1024 F4096 scratch": ("llama", SCRATCH_LLAMA, 1, 16, "sdpa", "dual", "float32", False, "auto"),
    "llama 2L d1024 F4096 bf16 scratch": ("llama", SCRATCH_LLAMA, 1, 16, "sdpa", "dual", "bfloat16", False, "auto"),
    "llama 4L d512 V2048 use_cache": ("llama", SMALL_LLAMA, 2, 512, "sdpa", "dual", "float32", True, "auto"),
}
# ZO2 paper (Wang et al. 2025, arXiv:2503.12668), GPU memory of OPT fine-tuning with ZO2, fp16, batch 1, seq 2048
ZO2_GB = {"opt-1.3b": 3.75, "opt-2.7b": 4.14, "opt-6.7b": 4.99, "opt-13b": 6.18, "opt-30b": 8.86, "opt-66b": 12.07,
          "opt-175b": 18.04}


def rss(field: str = "VmRSS") -> int:
    """Bytes of this process's resident set (VmRSS) or its peak since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def settle() -> int:
    """Free what can be freed, reset the peak and return the RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return rss()


def measure(name: str) -> dict:
    """In this (fresh) process: the RSS increase of weights and optimizer, and the peak of a ZO step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raw_zo_step import zo_step_fn

    model_type, fields, batch, seq, attention, schedule, dtype, use_cache, master_weights = CASES[name]
    torch.set_num_threads(2)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    x = torch.randint(config.vocab_size, (batch, seq))
    inputs = {"input_ids": x, "labels": x, "use_cache": use_cache}

    def build():
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation=attention)

    with torch.device("meta"):
        build()  # imports the modeling code, whose memory is not the weights'
    before = settle()
    model = build().eval()
    # builds the optimizer: its master copies count as weights
    step, _ = zo_step_fn(model, inputs, schedule, "rademacher", master_weights=master_weights)
    loaded = settle()
    step(0)  # warm-up: one-time allocations (thread pools, kernel caches) stay out of the measurement
    start = settle()
    step(1)
    return {"weights": loaded - before, "step": rss("VmHWM") - start}


def planned(name: str):
    from transformers import AutoConfig

    from zotune.plan import plan_memory

    model_type, fields, batch, seq, attention, schedule, dtype, _, master_weights = CASES[name]
    config = AutoConfig.for_model(model_type, **fields)
    return plan_memory(config, batch_size=batch, seq_len=seq, dtype=dtype, schedule=schedule, attention=attention,
                       master_weights=master_weights)


def check(names: list[str]) -> list[str]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", ZOTUNE_KERNELS="eager")
    header = (f"{'case':34} {'B×T':>8} {'master':>6} {'weights MB':>11} {'planned':>8} {'(master)':>8} {'err':>6}   "
              f"{'step MB':>8} {'planned':>8} {'(block':>7} {'head':>6} {'scratch)':>8} {'err':>6}")
    lines = [header]
    for name in names:
        _, _, batch, seq, *_rest, master_weights = CASES[name]
        run = subprocess.run([sys.executable, __file__, "--measure", name], env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"measuring {name!r} failed:\n{run.stderr[-4000:]}")
        got = json.loads(run.stdout.strip().splitlines()[-1])
        plan = planned(name)
        weights = plan.compute_params + plan.compute_master + plan.compute_buffers
        step = plan.compute_activations + plan.compute_scratch
        lines.append(
            f"{name:34} {f'{batch}×{seq}':>8} {master_weights:>6} {got['weights'] / 1e6:11.1f} {weights / 1e6:8.1f} "
            f"{plan.compute_master / 1e6:8.1f} {got['weights'] / weights - 1:+6.1%}   {got['step'] / 1e6:8.1f} "
            f"{step / 1e6:8.1f} {plan.block_activations / 1e6:7.1f} {plan.head_activations / 1e6:6.1f} "
            f"{plan.compute_scratch / 1e6:8.1f} {got['step'] / step - 1:+6.1%}"
        )
        print(lines[-1], flush=True)
    return lines


def zo2_table() -> str:
    """Markdown: the planner's compute-device peak for the known configs next to ZO2's figures."""
    from zotune.plan import GB, KNOWN_CONFIGS, known_config, plan_memory

    rows = [
        f"<!-- {COMMAND} -->",
        ("Compute-device peak of one dual ZO step planned by `zotune plan`: batch 1, sequence 2048, fp16 "
         "weights, in GB (10⁹ bytes). Resident: every weight on the device; with `zo.master_weights` auto the "
         "dual schedule keeps no fp32 master copy, with fp32 one beside every weight. Offload: the resident "
         "parts (embeddings, final norm, head), plus 3 blocks in flight; the blocks' home copies (and fp32 "
         "master copies, with fp32) stay on the host. All include the scratch (the largest module's perturbed "
         "copies), buffers and the activation peak (use_cache=False), not the CUDA context or allocator slack. "
         "Host: the offloaded run's host memory. ZO2: GPU memory reported in the ZO2 paper (Wang et al. 2025, "
         "arXiv:2503.12668), fp16, batch 1, sequence 2048."),
        "",
        "| model | parameters | resident, sdpa | resident, fp32 masters | offload, sdpa | offload, eager attention "
        "| host, offload | host, offload, fp32 masters | ZO2 (paper) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in KNOWN_CONFIGS:
        config = known_config(name)
        plans = [
            plan_memory(config, batch_size=1, seq_len=2048, dtype="float16", offload=offload, attention=attention,
                        master_weights=master)
            for offload, attention, master in ((False, "sdpa", "auto"), (False, "sdpa", "fp32"),
                                               (True, "sdpa", "auto"), (True, "eager", "auto"), (True, "sdpa", "fp32"))
        ]
        zo2 = f"{ZO2_GB[name]:.2f}" if name in ZO2_GB else "–"
        cells = " | ".join(f"{p.compute_total / GB:.2f}" for p in plans[:4])
        host = " | ".join(f"{p.host_total / GB:.2f}" for p in (plans[2], plans[4]))
        rows.append(f"| {name} | {plans[0].param_count / 1e9:.2f}B | {cells} | {host} | {zo2} |")
    return "\n".join(rows) + "\n"


def check_recipe(source: str, overrides: list[str]) -> None:
    from zotune.plan import GIB, plan_memory, recipe_config, recipe_settings
    from zotune.recipe import load_recipe
    from zotune.run import build_model, build_trainer

    recipe = load_recipe(source, overrides)
    plan = plan_memory(recipe_config(recipe), **recipe_settings(recipe))
    model, tokenizer = build_model(recipe)
    trainer, _ = build_trainer(recipe, model, tokenizer)
    for p in model.parameters():  # weights loaded lazily from a memory-mapped file count once read
        p.detach().sum()
    base = settle()
    print(f"{source} {' '.join(overrides)}\nplanned total {plan.compute_total / GIB:.2f} GiB (weights "
          f"{plan.compute_params / GIB:.2f}); baseline RSS {base / GIB:.2f} GiB (weights, libraries, data)", flush=True)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
        peak = rss("VmHWM") - base
        print(f"evaluation: {peak / GIB:.2f} GiB above the baseline, planned {plan.eval_activations / GIB:.2f} "
              f"({peak / plan.eval_activations - 1:+.1%})", flush=True)
        base = settle()
    trainer.train()
    peak, step = rss("VmHWM") - base, max(plan.block_activations, plan.head_activations) + plan.compute_scratch
    step += plan.compute_master
    print(f"training: {peak / GIB:.2f} GiB above the baseline, planned {step / GIB:.2f} ({peak / step - 1:+.1%}); "
          f"peak RSS {rss('VmHWM') / GIB:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--case", metavar="TEXT",
                        help="only the cases whose name contains TEXT; prints, writes no results file")
    parser.add_argument("--recipe", nargs="+", metavar="ARG", help="RECIPE [KEY=VALUE ...]: check a recipe's plan")
    args = parser.parse_args()
    if args.recipe:
        check_recipe(args.recipe[0], args.recipe[1:])
        return
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if args.case:
        names = [name for name in CASES if args.case in name]
        if not names:
            parser.error(f"no case contains {args.case!r}; the cases: {', '.join(CASES)}")
        check(names)
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_table.md").write_text(zo2_table())
    lines = check(list(CASES))
    import host

    top = (f"# {COMMAND}\n{host.line(2)}\n"
           "# one ZO step (zotune's DualEngine / ZOOptimizer), fp32 unless named, use_cache=False unless named; "
           "master = zo.master_weights; step = the step's peak above its start, planned as activations + scratch; "
           "err = measured / planned - 1\n")
    (RESULTS / "planner_check.txt").write_text(top + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
