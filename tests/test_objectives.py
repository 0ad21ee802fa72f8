"""`zo.objective`: ZO trains on a metric of the batch or a user function, checked against references computed here."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_causal_lm, tiny_config
from helpers import NOISE, make_trainer
from typer.testing import CliRunner

from zotune.cli import app
from zotune.noise import noise_like, seed_for, step_seed
from zotune.run import build_model, build_trainer
from zotune.schema import Recipe
from zotune.trajectory import read_trajectory

# the class is decided by the last (and only) byte, which a tiny model can learn to read
ROWS = [{"text": c, "label": k} for k, chars in enumerate(("abcdefgh", "ijklmnop")) for c in chars]
USER_MODULE = """\
CALLS = []
NOT_A_FUNCTION = 3

def constant(outputs, labels):
    CALLS.append(tuple(labels.shape))
    return outputs.logits.new_tensor([100.0 + len(labels)])

def per_row(outputs, labels):
    return outputs.logits[:, -1, 0]
"""


def recipe_dict(tmp_path, task="classification", **zo) -> dict:
    if task == "classification":
        (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        data = {"task": task, "train": {"path": str(tmp_path / "train.jsonl")}, "template": "{text}",
                "verbalizer": {"0": "n", "1": "y"}}
    else:
        (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 8)
        data = {"task": task, "train": {"path": str(tmp_path / "train.txt")}, "block_size": 16}
    return {
        "model": {"config": tiny_config("llama")},
        "data": data,
        "zo": {"eps": 0.05, "schedule": "sequential", **zo},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": len(ROWS),
                  "learning_rate": 0.05, "logging_steps": 1},
    }


def train(recipe: dict, **train):
    recipe = Recipe.model_validate({**recipe, "train": {**recipe["train"], **train}})
    model, tokenizer = build_model(recipe)
    trainer, _ = build_trainer(recipe, model, tokenizer)
    trainer.train()
    header, records = read_trajectory(recipe.train.output_dir)
    return model, header, records


def predictions(model, tokenizer) -> list[int]:
    """Each row run alone (no padding, no batching): the argmax of its label words' logits."""
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("n", "y")]
    model.eval()
    with torch.no_grad():
        return [model(**tokenizer(r["text"], return_tensors="pt")).logits[0, -1, words].argmax().item() for r in ROWS]


def accuracy(predicted: list[int]) -> float:
    return sum(p == r["label"] for p, r in zip(predicted, ROWS)) / len(ROWS)


def macro_f1(predicted: list[int]) -> float:
    labels = [r["label"] for r in ROWS]
    f1 = []
    for k in set(labels) | set(predicted):
        tp = sum(p == k and y == k for p, y in zip(predicted, labels))
        fp = sum(p == k and y != k for p, y in zip(predicted, labels))
        fn = sum(p != k and y == k for p, y in zip(predicted, labels))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


@pytest.mark.parametrize("objective, metric", [("accuracy", accuracy), ("f1", macro_f1)])
def test_logged_values_are_one_minus_the_metric_at_the_perturbed_weights(tmp_path, objective, metric):
    recipe = recipe_dict(tmp_path, objective=objective)
    _, header, records = train(recipe)

    s, eps = step_seed(0, 0), recipe["zo"]["eps"]
    expected = []
    for sign in (1, -1):
        shifted, tokenizer = build_model(Recipe.model_validate(recipe))
        with torch.no_grad():
            for name in header["params"]:
                p = shifted.get_parameter(name)
                p.add_(sign * eps * noise_like(p, seed_for(s, 0, name), NOISE))
        expected.append(1 - metric(predictions(shifted, tokenizer)))
    assert expected[0] != expected[1]  # else a run that ignored the perturbation could pass
    assert (records[0]["loss_plus"], records[0]["loss_minus"]) == ([expected[0]], [expected[1]])


def test_dual_equals_sequential_with_a_metric_objective(tmp_path):
    runs = {}
    for schedule in ("dual", "sequential"):
        (tmp_path / schedule).mkdir()
        recipe = recipe_dict(tmp_path / schedule, objective="accuracy", schedule=schedule)
        model, _, records = train(recipe, max_steps=4)
        assert all(r["schedule"] == schedule for r in records)  # dual did not fall back to fused
        runs[schedule] = model, records
    (dual, dual_records), (sequential, sequential_records) = runs["dual"], runs["sequential"]
    for key in ("loss_plus", "loss_minus", "g"):
        assert [r[key] for r in dual_records] == [r[key] for r in sequential_records], key
    assert any(r["g"] != [0.0] for r in dual_records)  # the weights moved
    for (name, a), b in zip(dual.named_parameters(), sequential.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_training_on_accuracy_raises_accuracy(tmp_path):
    recipe = recipe_dict(tmp_path, objective="accuracy")
    recipe["params"] = {"include": ["lm_head"]}  # few parameters: few steps of a piecewise-constant objective
    before = accuracy(predictions(*build_model(Recipe.model_validate(recipe))))
    model, _, _ = train(recipe, max_steps=30)
    _, tokenizer = build_model(Recipe.model_validate(recipe))
    assert accuracy(predictions(model, tokenizer)) >= before + 0.25


def test_a_user_function_by_import_path_is_what_trains(tmp_path, monkeypatch):
    (tmp_path / "zotune_objective_constant.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_dict(tmp_path, objective="zotune_objective_constant:constant")
    model, _, records = train(recipe, max_steps=2)
    value = 100.0 + len(ROWS)
    assert [(r["loss_plus"], r["loss_minus"], r["g"]) for r in records] == [([value], [value], [0.0])] * 2
    assert sys.modules["zotune_objective_constant"].CALLS == [(len(ROWS),)] * 4  # once per forward, with the labels


def double_cross_entropy(outputs, labels):
    """Twice the causal LM loss, by hand: labels are not shifted, -100 is not scored."""
    logits = outputs.logits[:, :-1].flatten(0, 1).float()
    return 2 * F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_zo_trainer_takes_a_function(tmp_path, schedule):
    records = {}
    for objective in ("loss", double_cross_entropy):
        out = tmp_path / ("loss" if objective == "loss" else "function")
        make_trainer(tiny_causal_lm("llama"), out, max_steps=1, zo_schedule=schedule, zo_objective=objective).train()
        records[objective] = read_trajectory(out)[1][0]
    # g = (L+ − L−) / 2ε carries the losses' float32 rounding (~1e-6) divided by 2ε = 2e-3
    for key, atol in (("loss_plus", 0), ("loss_minus", 0), ("g", 1e-2)):
        doubled = [2 * v for v in records["loss"][key]]
        torch.testing.assert_close(records[double_cross_entropy][key], doubled, rtol=1e-5, atol=atol, msg=key)


def cli(tmp_path, monkeypatch, command: str, task="classification", **zo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zotune_objective_errors.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "r.yaml").write_text("# zotune train r.yaml\n" + yaml.safe_dump(recipe_dict(tmp_path, task, **zo)))
    return CliRunner().invoke(app, [command, "r.yaml"])


@pytest.mark.parametrize(
    "objective, task, message",
    [
        ("acuracy", "classification", "unknown objective 'acuracy'; use one of loss, accuracy, f1 or an import path "
                                      "'package.module:function'; did you mean 'accuracy'?"),
        ("no_such_module:fn", "classification", "cannot import module 'no_such_module' of 'no_such_module:fn': "
                                                "ModuleNotFoundError: No module named 'no_such_module'"),
        ("zotune_objective_errors:constnt", "classification",
         "module 'zotune_objective_errors' has no attribute 'constnt'; did you mean 'constant'?"),
        ("zotune_objective_errors:NOT_A_FUNCTION", "classification",
         "zotune_objective_errors:NOT_A_FUNCTION is not callable: it is 3"),
        ("zotune_objective_errors:per_row", "classification",
         f"zotune_objective_errors:per_row returned a Tensor of shape ({len(ROWS)},), not a scalar"),
        ("accuracy", "lm", "'accuracy' is a classification metric"),
    ],
)
def test_a_bad_objective_is_a_clear_error(tmp_path, monkeypatch, objective, task, message):
    r = cli(tmp_path, monkeypatch, "train", task, objective=objective)
    assert r.exit_code == 2, r.output
    assert f"zo.objective: {message}" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


def test_validate_checks_the_form_but_imports_nothing(tmp_path, monkeypatch):
    assert cli(tmp_path, monkeypatch, "validate", objective="no_such_module:fn").exit_code == 0
    r = cli(tmp_path, monkeypatch, "validate", objective="no_such_module.fn")
    assert r.exit_code == 2 and "zo.objective: unknown objective 'no_such_module.fn'" in r.stderr
