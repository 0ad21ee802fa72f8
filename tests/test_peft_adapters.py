"""Every kind of peft adapter trains with ZO under every schedule, and replays bit for bit."""

import json

import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

import zotune.run
from zotune.recipe import load_recipe
from zotune.replay import replay
from zotune.trajectory import read_trajectory

ADAPTERS = {
    "LORA": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
             "model.layers.0.self_attn.q_proj.lora_A.default.weight"),
    "PREFIX_TUNING": ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
                      "prompt_encoder.default.embedding.weight"),
    "PROMPT_TUNING": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
                      "prompt_encoder.default.embedding.weight"),
    "IA3": ({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_proj"]}, "model.layers.0.self_attn.k_proj.ia3_l.default"),
}
CASES = [(adapter, schedule) for adapter in ADAPTERS for schedule in ("dual", "sequential", "fused")]


def write_recipe(folder, adapter: str, schedule: str):
    rows = [{"text": f"it was {w} {i}", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "awful"] * 4)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"config": tiny_config("llama"), "peft": ADAPTERS[adapter][0]},
        "data": {"task": "classification", "train": {"path": str(folder / "rows.jsonl")}, "template": "{text} It was",
                 "verbalizer": {"0": "n", "1": "y"}, "max_length": 32},
        "zo": {"eps": 1e-2, "schedule": schedule},
        "train": {"output_dir": str(folder / "run"), "max_steps": 3, "learning_rate": 0.1,
                  "per_device_train_batch_size": 4, "evaluate_before": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("adapter", "schedule"), CASES)
def test_adapter_trains_only_itself_and_replays_bit_for_bit(adapter, schedule, tmp_path, monkeypatch):
    path = write_recipe(tmp_path, adapter, schedule)
    recipe = load_recipe(str(path))
    initial, _ = zotune.run.build_model(recipe)
    start = {n: p.detach().clone() for n, p in initial.named_parameters()}
    built = []
    original = zotune.run.build_model
    monkeypatch.setattr(zotune.run, "build_model", lambda *a: built.append(original(*a)) or built[-1])
    zotune.run.train(recipe, str(path))
    trained = built[0][0]

    adapter_names = {n for n, p in trained.named_parameters() if p.requires_grad}
    for name, param in trained.named_parameters():
        if name in adapter_names:
            assert not torch.equal(param, start[name]), f"{name} did not train"
        else:
            assert torch.equal(param, start[name]), f"{name} is frozen but changed"

    header, records = read_trajectory(str(tmp_path / "run" / "zo_trajectory.jsonl"))
    assert len(records) == 3 and header["optimizer"]["schedule"] == schedule
    assert ADAPTERS[adapter][1] in header["params"]
    assert len(header["params"]) == len(adapter_names)
    assert not any(n.startswith(("base_model.", "module.")) for n in header["params"])

    replay(str(tmp_path / "run"), str(tmp_path / "run" / "zo_trajectory.jsonl"), str(tmp_path / "replayed"))
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    replayed = load_file(tmp_path / "replayed" / "adapter_model.safetensors")
    assert saved.keys() == replayed.keys() and saved
    for key in saved:
        assert torch.equal(saved[key], replayed[key]), key
