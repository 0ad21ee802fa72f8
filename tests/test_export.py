"""`zotune export`: adapters, merged and full models round-trip to the trained model's logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_causal_lm, tiny_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import zotune.run
from zotune.cli import app
from zotune.export import export
from zotune.recipe import load_recipe

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]


def write_data(folder: Path) -> Path:
    rows = [{"text": f"it was {w} {i}", "label": i % 2} for i, w in enumerate(WORDS * 2)]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_run(folder: Path, monkeypatch, peft: dict | None, **train) -> tuple[Path, torch.nn.Module]:
    """Train a tiny llama with `zotune.run.train`; returns the run directory and the trained model in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_data(folder)
    model = {"config": tiny_config("llama"), **({"peft": peft} if peft else {})}
    recipe = {
        "method": "fo",  # AdamW moves the weights far in a few steps, so a wrong export shows
        "model": model,
        "data": {"task": "classification", "train": {"path": str(data)}, "template": "{text} It was",
                 "verbalizer": {"0": "n", "1": "y"}, "max_length": 32},
        "train": {"output_dir": str(folder / "run"), "max_steps": 3, "learning_rate": 5e-2,
                  "per_device_train_batch_size": 4, **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    built = []
    original = zotune.run.build_model

    def keep(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(zotune.run, "build_model", keep)
    zotune.run.train(load_recipe(str(path)), str(path))
    monkeypatch.undo()
    return folder / "run", built[0][0].eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return train_run(tmp_path_factory.mktemp("lora"), mp, LORA, save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return train_run(tmp_path_factory.mktemp("full"), mp, None)


IDS = torch.tensor([[256, *b"it was good"], [256, *b"bad It was!"]])  # <bos> and UTF-8 bytes


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_moved(trained):
    """The trained model differs from its base, so equal logits below say something."""
    assert (logits(trained) - logits(tiny_causal_lm("llama"))).abs().max() > 1e-3


def test_adapter_export_loads_onto_a_fresh_base(lora_run, tmp_path):
    run, trained = lora_run
    assert_moved(trained)
    out = tmp_path / "adapter"
    assert export(str(run), str(out)) == "adapter"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), str(out)).eval()
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)


def test_merged_export_is_a_plain_model_with_the_adapter_logits(lora_run, tmp_path):
    run, trained = lora_run
    out = tmp_path / "merged"
    done = CliRunner().invoke(app, ["export", str(run), str(out), "--merge"])
    assert done.exit_code == 0, done.output
    assert "merged model" in done.output
    assert not (out / "adapter_config.json").exists()
    keys = load_file(out / "model.safetensors").keys()
    assert keys and not any("lora_" in k or k.startswith("base_model") for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), logits(trained), rtol=0, atol=1e-5)


def test_every_export_carries_a_model_card_of_its_run(lora_run, tmp_path):
    """The card states the run's recorded metrics, its data and its recipe."""
    from huggingface_hub import ModelCard

    run, _ = lora_run
    out = tmp_path / "carded"
    export(str(run), str(out))
    card = ModelCard.load(out / "README.md")
    assert "zotune" in card.data.tags and card.data.library_name == "peft"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("eval_accuracy_before", "eval_accuracy_after", "steps"):
        assert f"| {key} | {summary[key]} |" in card.text
    assert "No ZO trajectory (a first-order run)" in card.text  # a ZO run's hash: tests/test_run.py
    assert (run / "recipe.yaml").read_text().strip() in card.text
    assert load_recipe(str(run / "recipe.yaml")).data.train.path in card.text
    export(str(run / "checkpoint-2"), str(tmp_path / "early"))
    assert "checkpoint-2" in (tmp_path / "early/README.md").read_text()


def test_checkpoint_export_finds_the_recipe_in_the_run(lora_run, tmp_path):
    run, _ = lora_run
    checkpoint = run / "checkpoint-2"
    assert not (checkpoint / "recipe.yaml").exists()
    export(str(checkpoint), str(tmp_path / "out"))
    saved = load_file(checkpoint / "adapter_model.safetensors")
    exported = load_file(tmp_path / "out/adapter_model.safetensors")
    assert saved.keys() == exported.keys()
    final = load_file(run / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)  # the checkpoint's weights, not the run's
    for k in saved:
        assert torch.equal(saved[k], exported[k]), k


def test_full_weight_export(full_run, tmp_path):
    run, trained = full_run
    assert_moved(trained)
    out = tmp_path / "full"
    assert export(str(run), str(out)) == "full model"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)


def test_force_replaces_the_other_kind_of_weights(lora_run, tmp_path):
    run, trained = lora_run
    out = tmp_path / "out"
    export(str(run), str(out))
    (out / "notes.txt").write_text("mine")
    export(str(run), str(out), merge=True, force=True)
    assert not (out / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(merged), logits(trained), rtol=0, atol=1e-5)


def user_error(*args) -> str:
    done = CliRunner().invoke(app, ["export", *map(str, args)])
    assert done.exit_code == 2, done.output
    assert isinstance(done.exception, SystemExit) and "Traceback" not in done.output
    assert done.output.startswith("error: ")
    return " ".join(done.output.split())  # rich may wrap long lines


def test_errors_name_the_path(lora_run, full_run, tmp_path):
    lora, _ = lora_run
    full, _ = full_run
    missing = tmp_path / "nope"
    assert f"{missing}: no such directory" in user_error(missing, tmp_path / "o")

    bare = tmp_path / "bare"
    bare.mkdir()
    assert f"{bare}: no recipe.yaml" in user_error(bare, tmp_path / "o")

    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    shutil.copy(lora / "recipe.yaml", unsaved)
    assert f"{unsaved}: no saved weights" in user_error(unsaved, tmp_path / "o")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    message = user_error(lora, busy)
    assert f"{busy}: exists and is not empty" in message and "--force" in message
    assert sorted(p.name for p in busy.iterdir()) == ["x"]

    message = user_error(full, tmp_path / "o", "--merge")
    assert f"{full}:" in message and "nothing to merge" in message and "without --merge" in message
    assert "is the run directory" in user_error(lora, lora, "--force")
    assert not (tmp_path / "o").exists()
