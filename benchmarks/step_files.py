"""The zotune files one default `ZOTrainer` step runs code in: how far a reader follows a step.

    python benchmarks/step_files.py

A tiny Llama from config, the `ZOTrainer` defaults (dual, ZO-SGD, SPSA, the lazy update, the trajectory
written), two steps; the second is traced (`sys.setprofile`, from the Trainer's `on_step_begin` to its
`on_step_end`), and every file under zotune/ in which a Python function ran is listed with the number of
calls made into it. The first step is left out: it settles the schedule and compiles or loads the kernels.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from zotune.trainer import ZOConfig, ZOTrainer

PACKAGE = Path(__file__).resolve().parents[1] / "zotune"


class Trace(TrainerCallback):
    """Calls into zotune's files during the traced step, by file."""

    def __init__(self, step: int):
        self.step, self.calls = step, collections.Counter()

    def _profile(self, frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE):
                self.calls[str(path.relative_to(PACKAGE.parent))] += 1

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            sys.setprofile(self._profile)

    def on_step_end(self, args, state, control, **kwargs):
        sys.setprofile(None)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (32, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trace = Trace(step=2)
    with tempfile.TemporaryDirectory() as out:
        args = ZOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                        report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = ZOTrainer(model=model, args=args, train_dataset=data, callbacks=[trace])
        trainer.train()
    for path, calls in sorted(trace.calls.items()):
        print(f"{calls:6d}  {path}")
    kernels = sum(path.startswith("zotune/kernels/") for path in trace.calls)
    print(f"{len(trace.calls)} files ({kernels} of them the ops' in zotune/kernels/)")


if __name__ == "__main__":
    main()
