"""Does bf16 full-parameter ZO without master copies learn as well as with them?

    python benchmarks/precision_quality.py       # tiny Llama from config, 300 steps each, ~2 min

Every run trains the same tiny Llama (random init, bf16 unless stated) with ZOTrainer on the same
rows of a counting task (each sequence counts up by 3, mod 256) and reports the loss on held-out
rows before and after. Runs:

- fp32 masters: out-of-place dual, `master_weights: fp32` (the precision reference);
- no masters: out-of-place dual, `master_weights: none` (the default `auto` under dual): 16-bit
  weights, stochastically rounded updates;
- MeZO's way: in-place sequential, `master_weights: none`: +εz −2εz +εz in bf16 each step;
- fp32 weights: the same model in fp32, for scale.

The target: the no-master run lowers the held-out loss by at least 90% of what the fp32-master run
lowers it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, default_data_collator

import host
from zotune.trainer import ZOConfig, ZOTrainer

SEQ = 16
RUNS = {  # label -> (dtype, schedule, master_weights)
    "bf16, fp32 masters (dual)": (torch.bfloat16, "dual", "fp32"),
    "bf16, no masters (dual)": (torch.bfloat16, "dual", "none"),
    "bf16, no masters, in place (MeZO)": (torch.bfloat16, "sequential", "none"),
    "fp32 weights (dual)": (torch.float32, "dual", "auto"),
}


def counting(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 256, (n,), generator=g)
    ids = (starts[:, None] + 3 * torch.arange(SEQ)) % 256
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def tiny_llama(dtype):
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def held_out_loss(model, rows: Dataset) -> float:
    batch = default_data_collator([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        return model(**batch).loss.float().item()


def run(label: str, args, train: Dataset, held_out: Dataset) -> tuple[float, float]:
    dtype, schedule, master_weights = RUNS[label]
    model = tiny_llama(dtype)
    before = held_out_loss(model, held_out)
    config = ZOConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=16,
                      learning_rate=args.lr, zo_eps=args.eps, zo_schedule=schedule, zo_master_weights=master_weights,
                      lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True,
                      disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MeZO's way warns of its drift, which is what it shows
        ZOTrainer(model=model, args=config, train_dataset=train, data_collator=default_data_collator).train()
    return before, held_out_loss(model, held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(host.line())
    train, held_out = counting(512, seed=0), counting(64, seed=1)
    print(f"tiny Llama (2 layers, hidden 64), counting task, {args.steps} steps, lr {args.lr}, eps {args.eps}, "
          "batch 16, gaussian")
    print(f"{'run':<36}{'held-out loss before':>22}{'after':>8}{'lowered by':>12}")
    drops = {}
    for label in RUNS:
        before, after = run(label, args, train, held_out)
        drops[label] = before - after
        print(f"{label:<36}{before:>22.4f}{after:>8.4f}{before - after:>12.4f}")
        sys.stdout.flush()
    share = drops["bf16, no masters (dual)"] / drops["bf16, fp32 masters (dual)"]
    print(f"\nno masters / fp32 masters: {share:.1%} of the loss reduction (target >= 90%)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
