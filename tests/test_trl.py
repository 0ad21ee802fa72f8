"""trl's SFT and DPO trainers under ZO (`zotune.integrations.trl`), held to trl itself: the metrics
a plain trl trainer logs, under the same names and counts, and a preference loss that falls."""

import pytest
import torch
from conftest import tiny_causal_lm
from datasets import Dataset
from peft import LoraConfig

pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

from zotune.integrations.trl import ZODPOConfig, ZODPOTrainer, ZOSFTConfig, ZOSFTTrainer  # noqa: E402
from zotune.models import byte_tokenizer  # noqa: E402

TEXTS = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(32)]
COMMON = dict(max_steps=4, per_device_train_batch_size=4, logging_steps=2, report_to="none", save_strategy="no",
              use_cpu=True, max_length=32)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _sft(trainer_cls, config_cls, tmp_path, peft_config=None, **kw):
    args = config_cls(output_dir=str(tmp_path), learning_rate=1e-3, **COMMON, **kw)
    trainer = trainer_cls(model=tiny_causal_lm("llama"), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                          processing_class=byte_tokenizer(), peft_config=peft_config)
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_zo_sft_logs_trls_training_metrics_as_trl_does(schedule, tmp_path):
    """A LoRA policy: trl's fused head reads only the frozen head, so dual splits trl's loss."""
    zo, zo_logs = _sft(ZOSFTTrainer, ZOSFTConfig, tmp_path / "zo", LORA, zo_eps=1e-2, zo_schedule=schedule)
    _, fo_logs = _sft(SFTTrainer, SFTConfig, tmp_path / "fo", LORA)
    trl_keys = {"entropy", "mean_token_accuracy", "num_tokens"}
    for zo_log, fo_log in zip(zo_logs, fo_logs, strict=True):
        assert trl_keys <= zo_log.keys() and trl_keys <= fo_log.keys()
        assert not any(k.startswith("eval_") for k in zo_log)
        assert zo_log["num_tokens"] == fo_log["num_tokens"]  # each batch counted once, as trl counts it
    assert zo.zo.schedule == schedule and zo.losses.one_forward


def test_zo_sft_full_parameter_reads_the_head_outside_it_and_trains_in_place(tmp_path, caplog):
    """trl's fused LM head reads the head's weight directly: the probe must see it."""
    with caplog.at_level("WARNING", logger="zotune"):
        zo, _ = _sft(ZOSFTTrainer, ZOSFTConfig, tmp_path, zo_eps=1e-2)
    assert zo.zo.schedule == "fused" and "reads lm_head.weight outside the module" in caplog.text


def test_zo_dpo_with_a_lora_policy_stays_out_of_place_and_learns_the_preference(tmp_path):
    rows = {"prompt": [f"{i} is" for i in range(16)], "chosen": [" even" if i % 2 == 0 else " odd" for i in range(16)],
            "rejected": [" odd" if i % 2 == 0 else " even" for i in range(16)]}
    args = ZODPOConfig(output_dir=str(tmp_path), learning_rate=0.3, zo_eps=1e-2,
                       **{**COMMON, "max_steps": 30, "per_device_train_batch_size": 8, "logging_steps": 10})
    trainer = ZODPOTrainer(model=tiny_causal_lm("llama"), args=args, train_dataset=Dataset.from_dict(rows),
                           processing_class=byte_tokenizer(),
                           peft_config=LORA)
    trainer.train()
    assert trainer.zo.schedule == "dual" and trainer.losses.one_forward
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[-1]["loss"] < logs[0]["loss"] < torch.log(torch.tensor(2.0)).item() + 1e-3
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
