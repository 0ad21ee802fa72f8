"""Safe defaults: YAML is loaded safely, remote code stays off, weights are safetensors, other
checkpoint files load with weights_only=True, recipe values never reach a shell or eval, and a
user objective module is imported only when the recipe names it, at training time."""

from __future__ import annotations

import ast
import json
import logging
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

import zotune
from zotune import yaml_safe
from zotune.errors import UserError
from zotune.recipe import RecipeError, load_recipe

PACKAGE = Path(zotune.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(name_test) -> list[tuple[Path, ast.Call]]:
    """Every call in zotune's sources whose dotted callee name satisfies `name_test`."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and name_test(ast.unparse(node.func)):
                found.append((path, node))
    return found


def write_data(folder: Path) -> None:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(8)]
    for name in ("train.jsonl", "eval.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe_dict(folder: Path, **train) -> dict:
    return {
        "model": {"config": tiny_config("llama")},
        "data": {"task": "classification", "train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"},
                 "template": "{text} It was", "verbalizer": {"0": "n", "1": "y"}, "max_length": 16},
        "zo": {"schedule": "sequential"},
        "train": {"output_dir": str(folder / "run"), "max_steps": 2, "per_device_train_batch_size": 2,
                  "logging_steps": 1, "evaluate_before": False, **train},
    }


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch pwned']",
    "!!python/object/new:os.system ['touch pwned']",
    "!!python/object:zotune.errors.UserError {}",
    "!!python/name:os.system",
    "!!python/module:os",
])
def test_python_tags_are_refused(folder, tag):
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe_dict(folder)) + f"extra: {tag}\n")
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_recipe("r.yaml")
    with pytest.raises(RecipeError):
        load_recipe(str(folder / "r.yaml").replace("r.yaml", "r.yaml"), [f"train.output_dir={tag}"])
    assert not (folder / "pwned").exists()


def test_every_yaml_load_is_safe():
    assert issubclass(yaml_safe._Loader, yaml.SafeLoader)
    assert not issubclass(yaml_safe._Loader, (yaml.FullLoader, yaml.UnsafeLoader))
    unsafe = calls(lambda f: f in {"yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"})
    assert not unsafe
    for path, call in calls(lambda f: f == "yaml.load"):
        loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
        assert loader is not None and ast.unparse(loader) in {"_Loader", "yaml.SafeLoader"}, path
    for path in SOURCES:
        text = path.read_text()
        assert "yaml.Loader" not in text and "UnsafeLoader" not in text and "FullLoader" not in text, path


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_off_unless_the_recipe_says_so(folder, monkeypatch, caplog):
    from transformers import AutoConfig

    from zotune.models import load_model

    seen = []

    def record(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoConfig, "from_pretrained", record)
    (folder / "model").mkdir()
    base = recipe_dict(folder)
    base["model"] = {"name_or_path": "./model"}
    # keys that must not switch it on: a model config field, an override elsewhere
    sneaky = dict(base, model={"name_or_path": "./model", "peft": None})
    for data, overrides in [(base, []), (sneaky, ["train.report_to=[trust_remote_code]"])]:
        (folder / "r.yaml").write_text(yaml.safe_dump(data))
        recipe = load_recipe("r.yaml", overrides)
        assert recipe.model.trust_remote_code is False
        with pytest.raises(UserError):
            load_model(recipe.model)
    assert seen == [False, False]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune"):
        recipe = load_recipe("r.yaml", ["model.trust_remote_code=true"])
    assert recipe.model.trust_remote_code is True
    assert any("trust_remote_code is on" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError):
        load_model(recipe.model)
    assert seen[-1] is True
    # every from_pretrained in zotune passes trust_remote_code on from the recipe, never a literal True
    for path, call in calls(lambda f: f.endswith("from_pretrained")):
        for k in call.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), path


# ---------------------------------------------------------------- weights: safetensors; the rest: weights_only


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run that saves a checkpoint, and its export."""
    from zotune.export import export
    from zotune.run import train

    folder = tmp_path_factory.mktemp("run")
    write_data(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        (folder / "r.yaml").write_text(yaml.safe_dump(recipe_dict(folder, save_strategy="steps", save_steps=1)))
        train(load_recipe("r.yaml"), "r.yaml")
        export(str(folder / "run"), str(folder / "exported"))
    return folder


def test_weights_are_saved_as_safetensors_only(trained):
    run, exported = trained / "run", trained / "exported"
    for folder in [run, exported, *run.glob("checkpoint-*")]:
        assert (folder / "model.safetensors").is_file(), folder
        weights = [p.name for pattern in ("*model*.bin", "*model*.pt", "*model*.pth") for p in folder.glob(pattern)]
        assert not weights, (folder, weights)
    assert not [p for pattern in PICKLE_WEIGHTS for p in exported.glob(pattern)]


class Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_checkpoint_pickles_load_with_weights_only(trained, monkeypatch):
    """A checkpoint's optimizer / rng / scheduler files carrying code are refused on resume."""
    from zotune.run import train

    checkpoint = sorted((trained / "run").glob("checkpoint-*"))[-1]
    monkeypatch.chdir(trained)
    tried = [name for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt") if (checkpoint / name).is_file()]
    assert "rng_state.pth" in tried
    for name in tried:
        original = (checkpoint / name).read_bytes()
        torch.save({"state": Payload()}, checkpoint / name)
        try:
            recipe = load_recipe("r.yaml", [f"train.resume_from_checkpoint={checkpoint}", "train.max_steps=3",
                                            f"train.output_dir={trained / 'resumed'}"])
            with pytest.raises(pickle.UnpicklingError):
                train(recipe, "r.yaml")
            assert not (trained / "pwned").exists(), name
        finally:
            (checkpoint / name).write_bytes(original)
    # and zotune itself never calls torch.load without weights_only=True
    for path, call in calls(lambda f: f in {"torch.load", "load"} and "torch" in f):
        assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords), path
    assert not calls(lambda f: f in {"pickle.load", "pickle.loads", "dill.load", "joblib.load"})


# ---------------------------------------------------------------- no shell, no eval


def test_no_shell_or_eval_in_zotune():
    assert not calls(lambda f: f in {"eval", "exec", "compile", "os.system", "os.popen", "__import__"})
    spawned = calls(lambda f: f.startswith(("subprocess.", "os.exec", "os.spawn")))
    # the one process zotune starts: the C compiler building the native noise, from an argument list
    # (no shell) that no recipe value reaches
    assert [(path.relative_to(PACKAGE).as_posix(), ast.unparse(call.func)) for path, call in spawned] == [
        ("kernels/_native.py", "subprocess.run")]
    assert not [k for _, call in spawned for k in call.keywords if k.arg == "shell"]


HOSTILE = ["$(touch pwned)", "`touch pwned`", "; touch pwned", "| touch pwned", "&& touch pwned",
           "__import__('os').system('touch pwned')", "{__import__('os').system('touch pwned')}",
           "${HOME}", "'; DROP TABLE x; --"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_recipe_values_are_inert(folder, value):
    data = recipe_dict(folder)
    data["train"]["output_dir"] = value
    data["train"]["lr_scheduler_type"] = value
    data["train"]["report_to"] = [value]
    data["data"]["train"]["name"] = value
    data["model"]["config"]["note"] = value
    (folder / "r.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe("r.yaml", [f"data.eval.split={json.dumps(value)}"])
    # values arrive verbatim, as plain strings
    assert recipe.train.output_dir == value and recipe.train.report_to == [value]
    assert recipe.model.config["note"] == value and recipe.data.eval.split == value
    assert not (folder / "pwned").exists()


@pytest.mark.parametrize("template", ["{text.__class__}", "{text.__class__.__mro__[1].__subclasses__}",
                                      "{label.__init__.__globals__}", "{text. _x}"])
def test_templates_cannot_read_private_attributes(folder, template):
    from zotune.data import build_task_data
    from zotune.models import byte_tokenizer
    from zotune.schema import DataSection, DataSource

    section = DataSection(task="lm", train=DataSource(path="train.jsonl"), template=template)
    with pytest.raises(UserError, match="private attribute"):
        build_task_data(section, byte_tokenizer(), None, seed=0, batch_size=2)


# ---------------------------------------------------------------- user objectives


SIDE_EFFECT = """\
from pathlib import Path
Path(__file__).with_name("imported.marker").write_text("imported")

def objective(outputs, labels):
    return 0.0
"""


@pytest.fixture
def user_module(folder, monkeypatch):
    (folder / "zotune_side_effect_mod.py").write_text(SIDE_EFFECT)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "zotune_side_effect_mod", raising=False)
    yield folder / "imported.marker"
    sys.modules.pop("zotune_side_effect_mod", None)


def test_objective_module_is_not_imported_unless_named(folder, user_module):
    from typer.testing import CliRunner

    from zotune.cli import app
    from zotune.objectives import load_objective

    (folder / "r.yaml").write_text(yaml.safe_dump(recipe_dict(folder)))
    assert CliRunner().invoke(app, ["validate", "r.yaml"]).exit_code == 0
    assert load_objective(load_recipe("r.yaml").zo.objective) is None  # loss: the trainer's own
    assert not user_module.exists() and "zotune_side_effect_mod" not in sys.modules

    # named: validate checks the form only and still imports nothing (importing runs the module's code)
    named = ["zo.objective=zotune_side_effect_mod:objective"]
    r = CliRunner().invoke(app, ["validate", "r.yaml", *named])
    assert r.exit_code == 0, r.output
    assert not user_module.exists() and "zotune_side_effect_mod" not in sys.modules

    # it is imported when the trainer is configured with it, and only then
    fn = load_objective(load_recipe("r.yaml", named).zo.objective)
    assert user_module.exists() and fn(None, None) == 0.0
