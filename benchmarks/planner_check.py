"""Check `zotune.plan` against measured memory on small CPU models, and write the planner's table.

    python benchmarks/planner_check.py     # about a minute on 2 cores

Each case runs in a fresh subprocess: it builds the model from its config, then runs real
ZO steps (`ZOOptimizer`; for dual the `DualEngine` and `half_losses` the trainer uses: one no-grad
forward of the doubled batch, each module perturbed around its own call, then each half's
loss; rademacher noise, eager kernels). Measured, from /proc/self/status:
- weights: the RSS increase of building the model and the optimizer (fp32 master copies of
  16-bit weights), against the planned parameter + master + buffer bytes;
- activations: the peak RSS of a step above the RSS before it (VmHWM, reset through
  /proc/self/clear_refs after a warm-up step), against the planned activation peak.
glibc is told to serve every allocation over 64 KiB with mmap, so freed tensors leave the
RSS at once and the peak follows the live bytes, as a caching GPU allocator's would not.
Forwards pass use_cache=False, as the planner assumes, except in the case marked
"use_cache": transformers' default, which keeps every layer's k and v.

Writes benchmarks/results/planner_check.txt and benchmarks/results/plan_table.md (the
planner's compute-device peak for OPT and Llama 3 next to ZO2's published GPU figures).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMMAND = "python benchmarks/planner_check.py"

SMALL_LLAMA = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1408, vocab_size=2048, max_position_embeddings=1024)
GPT2_BIG_VOCAB = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=50257)
# name -> (model_type, config fields, batch B, seq T, attention, schedule, dtype, use_cache)
CASES = {
    "gpt2 4L d256 V50257": ("gpt2", GPT2_BIG_VOCAB, 2, 256, "sdpa", "dual", "float32", False),
    "gpt2 4L d256 V50257 eager": ("gpt2", GPT2_BIG_VOCAB, 2, 512, "eager", "dual", "float32", False),
    "gpt2 4L d768 V2048": ("gpt2", dict(n_layer=4, n_embd=768, n_head=12, vocab_size=2048), 2, 512, "sdpa", "dual",
                           "float32", False),
    "opt 4L d512 V2048 eager": ("opt", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                            ffn_dim=2048, vocab_size=2048, word_embed_proj_dim=512), 2, 512, "eager",
                                "dual", "float32", False),
    "llama 4L d512 V2048": ("llama", SMALL_LLAMA, 2, 512, "sdpa", "dual", "float32", False),
    "llama 4L d512 V2048 eager": ("llama", SMALL_LLAMA, 2, 512, "eager", "dual", "float32", False),
    "llama 4L d512 V2048 eager seq": ("llama", SMALL_LLAMA, 2, 512, "eager", "sequential", "float32", False),
    "llama 4L d512 V32000 bf16": ("llama", dict(SMALL_LLAMA, vocab_size=32000), 2, 256, "sdpa", "dual", "bfloat16",
                                  False),
    "llama 4L d512 V2048 use_cache": ("llama", SMALL_LLAMA, 2, 512, "sdpa", "dual", "float32", True),
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

    from zo_steps import zo_step_fn

    model_type, fields, batch, seq, attention, schedule, dtype, use_cache = CASES[name]
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
    step, _ = zo_step_fn(model, inputs, schedule, "rademacher")  # builds the optimizer: masters count as weights
    loaded = settle()
    step(0)  # warm-up: one-time allocations (thread pools, kernel caches) stay out of the measurement
    start = settle()
    step(1)
    return {"weights": loaded - before, "activations": rss("VmHWM") - start}


def planned(name: str):
    from transformers import AutoConfig

    from zotune.plan import plan_memory

    model_type, fields, batch, seq, attention, schedule, dtype, _ = CASES[name]
    config = AutoConfig.for_model(model_type, **fields)
    return plan_memory(config, batch_size=batch, seq_len=seq, dtype=dtype, schedule=schedule, attention=attention)


def check() -> list[str]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", ZOTUNE_KERNELS="eager")
    header = (f"{'case':31} {'B×T':>8} {'weights MB':>11} {'planned':>8} {'err':>6}   "
              f"{'activations MB':>14} {'planned':>8} {'(block':>7} {'head)':>6} {'err':>6}")
    lines = [header]
    for name, (_, _, batch, seq, *_rest) in CASES.items():
        run = subprocess.run([sys.executable, __file__, "--measure", name], env=env, capture_output=True, text=True,
                             check=True)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        plan = planned(name)
        weights = plan.compute_params + plan.compute_master + plan.compute_buffers
        lines.append(
            f"{name:31} {f'{batch}×{seq}':>8} {got['weights'] / 1e6:11.1f} {weights / 1e6:8.1f} "
            f"{got['weights'] / weights - 1:+6.1%}   {got['activations'] / 1e6:14.1f} "
            f"{plan.compute_activations / 1e6:8.1f} {plan.block_activations / 1e6:7.1f} "
            f"{plan.head_activations / 1e6:6.1f} {got['activations'] / plan.compute_activations - 1:+6.1%}"
        )
        print(lines[-1], flush=True)
    return lines


def zo2_table() -> str:
    """Markdown: the planner's compute-device peak for the known configs next to ZO2's figures."""
    from zotune.plan import GB, KNOWN_CONFIGS, known_config, plan_memory

    rows = [
        f"<!-- {COMMAND} -->",
        ("Compute-device peak of one dual ZO step planned by `zotune plan`: batch 1, sequence 2048, fp16 "
         "weights, in GB (10⁹ bytes). Resident: every weight and its fp32 master copy on the device. Offload: "
         "the resident parts (embeddings, final norm, head) and their fp32 master copy, plus 3 blocks in flight; "
         "the blocks' home copies and master copies stay on the host. Both include buffers and the activation "
         "peak (use_cache=False), not the CUDA context or allocator slack. ZO2: GPU memory reported in the ZO2 "
         "paper (Wang et al. 2025, arXiv:2503.12668), fp16, batch 1, sequence 2048."),
        "",
        "| model | parameters | resident, sdpa | offload, sdpa | offload, eager attention | ZO2 (paper) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in KNOWN_CONFIGS:
        config = known_config(name)
        plans = [
            plan_memory(config, batch_size=1, seq_len=2048, dtype="float16", offload=offload, attention=attention)
            for offload, attention in ((False, "sdpa"), (True, "sdpa"), (True, "eager"))
        ]
        zo2 = f"{ZO2_GB[name]:.2f}" if name in ZO2_GB else "–"
        cells = " | ".join(f"{p.compute_total / GB:.2f}" for p in plans)
        rows.append(f"| {name} | {plans[0].param_count / 1e9:.2f}B | {cells} | {zo2} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_table.md").write_text(zo2_table())
    lines = check()
    import torch
    import transformers

    top = (f"# {COMMAND}   ({platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
           f"transformers {transformers.__version__})\n"
           "# one ZO step (zotune's DualEngine / ZOOptimizer), fp32 unless named, use_cache=False unless named; "
           "err = measured / planned - 1\n")
    (RESULTS / "planner_check.txt").write_text(top + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
