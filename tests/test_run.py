"""`zotune train` and `zotune replay` end to end on tiny models and the shared data."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_causal_lm, tiny_config
from helpers import DATA, needs_data, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from zotune.cli import app
from zotune.recipe import load_recipe
from zotune.run import build_model, train

pytestmark = needs_data


def moved(recipe, saved: dict) -> bool:
    """Whether the saved weights differ from the recipe's initial model."""
    initial = build_model(recipe)[0].state_dict()
    return any(not torch.equal(initial[name], tensor) for name, tensor in saved.items())


def cli(*args: str) -> Result:
    """`zotune ARGS` in this process (a subprocess would pay the imports again). An exception other than the
    CLI's exit is raised here: a user would have met its traceback."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_zo_run_reports_before_after_and_replays_bit_exact(tmp_path):
    path = write_recipe(tmp_path)
    summary = train(load_recipe(str(path)), str(path))
    run = Path(summary["output_dir"])
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 0
    assert 0 <= summary["eval_accuracy_before"] <= 1 and 0 <= summary["eval_accuracy_after"] <= 1
    assert (run / "recipe.yaml").is_file() and (run / "zo_trajectory.jsonl").is_file()

    done = cli("replay", str(run), str(run / "zo_trajectory.jsonl"), str(tmp_path / "replayed"))
    assert done.exit_code == 0, done.stderr
    trained, replayed = load_file(run / "model.safetensors"), load_file(tmp_path / "replayed/model.safetensors")
    assert trained.keys() == replayed.keys()
    for name in trained:
        assert torch.equal(trained[name], replayed[name]), name
    assert moved(load_recipe(str(path)), trained)  # else replay equal to trained would prove nothing


def test_the_model_card_of_an_export_names_the_trajectory_it_replays_from(tmp_path):
    import hashlib

    from zotune.export import export

    path = write_recipe(tmp_path)
    run = Path(train(load_recipe(str(path)), str(path))["output_dir"])
    export(str(run), str(tmp_path / "out"))
    card = (tmp_path / "out/README.md").read_text()
    digest = hashlib.sha256((run / "zo_trajectory.jsonl").read_bytes()).hexdigest()
    assert f"`zo_trajectory.jsonl` sha256 `{digest}`" in card


def test_replay_refuses_a_different_base(tmp_path):
    path = write_recipe(tmp_path)
    train(load_recipe(str(path)), str(path))
    other = write_recipe(tmp_path, train={"seed": 1})  # same recipe, different init seed
    done = cli("replay", str(other), str(tmp_path / "run/zo_trajectory.jsonl"), str(tmp_path / "out"))
    assert done.exit_code == 2 and "initial weights differ" in done.stderr


def test_fo_baseline_runs_the_same_recipe(tmp_path):
    path = write_recipe(tmp_path, method="fo", train={"max_steps": 6, "learning_rate": 1e-2})
    recipe = load_recipe(str(path))
    summary = train(recipe, str(path))
    assert summary["method"] == "fo" and summary["steps"] == 6
    assert moved(recipe, load_file(Path(summary["output_dir"]) / "model.safetensors"))
    assert not (Path(summary["output_dir"]) / "zo_trajectory.jsonl").exists()


@pytest.mark.parametrize("method", ["zo", "fo"])
def test_lora_trains_only_the_adapter(tmp_path, method):
    path = write_recipe(
        tmp_path,
        method=method,
        model={"config": tiny_config("qwen2"), "peft": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}},
    )
    summary = train(load_recipe(str(path)), str(path))
    adapter = load_file(Path(summary["output_dir"]) / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    if method == "zo":
        header = json.loads((Path(summary["output_dir"]) / "zo_trajectory.jsonl").read_text().splitlines()[0])
        assert header["params"] and all("lora_" in n and not n.startswith("base_model") for n in header["params"])


def test_fo_activation_checkpointing_recomputes_the_same_lora_update(tmp_path):
    """The memory-saving first-order baseline: an adapter under activation checkpointing gets the
    gradients it gets without (the activations are recomputed, not approximated)."""
    adapters = {}
    for checkpointing in (False, True):
        (tmp_path / str(checkpointing)).mkdir()
        path = write_recipe(tmp_path / str(checkpointing), method="fo",
                            model={"config": tiny_config("qwen2"),
                                   "peft": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}},
                            train={"max_steps": 3, "learning_rate": 1e-2, "activation_checkpointing": checkpointing})
        summary = train(load_recipe(str(path)), str(path))
        adapters[checkpointing] = load_file(Path(summary["output_dir"]) / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for name, weight in adapters[True].items():
        torch.testing.assert_close(weight, adapters[False][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in adapters[True].values())


@pytest.mark.parametrize(
    "task, data",
    [
        ("lm", {"train": {"path": str(DATA / "austen/persuasion.txt"), "max_samples": 200},
                "eval": {"path": str(DATA / "austen/emma.txt"), "max_samples": 100}, "block_size": 32,
                "max_length": 256}),  # back to the default: lm reads block_size, and refuses a max_length
        ("sft", {"train": {"path": str(DATA / "bbc_news/train.jsonl"), "max_samples": 32},
                 "eval": {"path": str(DATA / "bbc_news/validation.jsonl"), "max_samples": 8},
                 "template": "Headline: {title}\nTopic:", "completion_field": "label", "max_length": 48}),
    ],
)
def test_lm_and_sft_tasks_run(tmp_path, task, data):
    fields = {"task": task, "balanced": False, "verbalizer": None, **data}
    path = write_recipe(tmp_path, data=fields)
    summary = train(load_recipe(str(path)), str(path))
    assert summary["steps"] == 4 and summary["eval_loss_after"] > 0


def test_bad_data_is_a_clear_error(tmp_path):
    path = write_recipe(tmp_path, data={"label_field": "stars"})
    done = cli("train", str(path))
    assert done.exit_code == 2
    assert "stars" in done.stderr and "train.jsonl" in done.stderr


def test_replay_refuses_a_log_of_the_earlier_in_place_dual(tmp_path):
    path = write_recipe(tmp_path)
    train(load_recipe(str(path)), str(path))
    log = tmp_path / "run/zo_trajectory.jsonl"
    header, *records = [json.loads(line) for line in log.read_text().splitlines()]
    for row in (header, *records):
        del row["chain"]  # an earlier zotune wrote unchained logs of format 2
    header["format"] = "zotune-trajectory/2"
    header["optimizer"]["schedule"] = "dual"
    del header["optimizer"]["master_weights"]  # what an earlier zotune wrote
    log.write_text("".join(json.dumps(row) + "\n" for row in (header, *records)))
    done = cli("replay", str(path), str(log), str(tmp_path / "out"))
    assert done.exit_code == 2 and "recorded by an earlier zotune" in done.stderr


def test_a_zo_run_plots_its_steps_and_the_plot_command_redraws_them(tmp_path):
    from zotune.plot import _eval_series

    path = write_recipe(tmp_path)
    run = Path(train(load_recipe(str(path)), str(path))["output_dir"])
    assert (run / "zo_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    evals = _eval_series(history)
    assert evals and all(name.startswith("eval_") and not name.endswith(("_runtime", "_time")) for name in evals)
    assert sum(len(s) for s in evals.values()) == sum(k in evals for h in history for k in h)
    done = cli("plot", str(run), "--out", str(tmp_path / "again.png"))
    assert done.exit_code == 0 and (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = cli("plot", str(tmp_path))
    assert done.exit_code == 2 and "no zo_trajectory.jsonl" in done.stderr


def test_train_loads_the_tokenizer_once(tmp_path, monkeypatch):
    """The tokenizer `zotune train`'s checks load (the label words) is the one the run trains with: a large
    vocabulary's takes seconds to load."""
    from transformers import AutoTokenizer

    from zotune.models import byte_tokenizer

    tiny_causal_lm("llama").save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    path = write_recipe(tmp_path, model={"config": None, "name_or_path": str(tmp_path / "model")})
    loads, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    summary = train(load_recipe(str(path)), str(path))
    assert summary["steps"] == 4 and len(loads) == 1
