"""The ZO settings model (`zotune.settings`): one definition reaches the recipe, `ZOConfig`, the
trajectory header, replay and the bilevel mode; trajectories written before it still replay."""

import ast
import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

from helpers import DATA, needs_data

from zotune.bilevel import loop
from zotune.bilevel.loop import ScaleBiO
from zotune.models import load_model
from zotune.optim import ZOOptimizer
from zotune.recipe import RecipeError, load_recipe
from zotune.replay import replay
from zotune.schema import Recipe
from zotune.settings import ZOSettings
from zotune.trainer import ZOConfig
from zotune.trajectory import params_digest

LEGACY = Path(__file__).resolve().parent / "data" / "trajectories_v0"
ROOT = Path(__file__).resolve().parents[1]

# Names of ZO settings that other code defines with a default of its own meaning, not the setting's.
OTHER_MEANINGS = {
    ("zotune/optim.py", "run_in_place", "schedule"): "which in-place schedule to switch to",
    ("zotune/plan.py", "plan_memory", "offload"): "a bool: whether the plan streams the blocks",
    ("zotune/methods/rules/adam.py", "AdamConfig", "eps"): "Adam's denominator epsilon",
    ("zotune/integrations/trl.py", "ZOGRPOConfig", "zo_rule"): "GRPO's stand-in trains by ES's rule, not ZO-SGD",
}


def base_recipe(tmp_path: Path) -> Path:
    """The recipe whose model the committed trajectories were recorded from (tiny llama, train.seed 0)."""
    recipe = {
        "model": {"config": tiny_config("llama")},
        "data": {"task": "classification", "train": {"path": str(DATA / "rotten_tomatoes/train.jsonl")},
                 "verbalizer": {"0": "n", "1": "y"}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@needs_data
@pytest.mark.parametrize("case", ["dual_lazy", "fused_momentum"])
def test_a_trajectory_written_before_the_settings_model_replays_to_the_same_weights(tmp_path, case):
    expected = json.loads((LEGACY / "expected.json").read_text())[case]
    replay(str(base_recipe(tmp_path)), str(LEGACY / f"{case}.jsonl"), str(tmp_path / "out"))
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert params_digest(sorted(weights.items())) == expected["weights_sha256"]


def test_the_perturbations_are_the_noise_kinds():
    from zotune.noise import KINDS
    from zotune.settings import PERTURBATIONS

    assert PERTURBATIONS == KINDS


# a setting added in one place: a subclass of the model with one more field, put in its place
# before anything else imports it
WITH_A_DUMMY_SETTING = """
import json, sys
from pydantic import Field
import zotune.settings as settings

class WithDummy(settings.ZOSettings):
    dummy: int = Field(7, ge=0, description="A setting added in one place.")

settings.ZOSettings = WithDummy

import dataclasses
import torch
from zotune.preflight import training_arguments
from zotune.recipe import load_recipe
from zotune.replay import optimizer_from_header
from zotune.run import train
from zotune.settings import from_header
from zotune.trainer import ZOConfig
from zotune.trajectory import read_trajectory

recipe = load_recipe(sys.argv[1])
defaults = {f.name: f.default for f in dataclasses.fields(ZOConfig)}
try:
    ZOConfig(output_dir=sys.argv[2], zo_dummy=-1)
    refused = None
except ValueError as e:
    refused = str(e)
train(recipe, sys.argv[1])
header, records = read_trajectory(sys.argv[2])
print(json.dumps({
    "recipe": recipe.zo.dummy,
    "zoconfig_default": defaults["zo_dummy"],
    "zoconfig": training_arguments(recipe).zo_dummy,
    "zoconfig_refuses": refused,
    "header": header["optimizer"].get("dummy"),
    "replay": from_header(header["optimizer"]).dummy,
    "replay_optimizer": optimizer_from_header(header, [("x", torch.nn.Parameter(torch.zeros(2)))]).q,
}))
"""


def tiny_recipe(tmp_path: Path, **zo) -> Path:
    recipe = yaml.safe_load(base_recipe(tmp_path).read_text())
    recipe["data"]["train"]["max_samples"] = 8
    recipe["data"]["max_length"] = 16
    recipe["zo"] = {"eps": 1e-2, **zo}
    recipe["train"] = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2,
                       "evaluate_before": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@needs_data
def test_a_setting_added_to_the_model_alone_reaches_the_recipe_zoconfig_the_header_and_replay(tmp_path):
    path = tiny_recipe(tmp_path, dummy=3, num_directions=2)
    done = subprocess.run([sys.executable, "-c", WITH_A_DUMMY_SETTING, str(path), str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["zoconfig_default"] == 7  # the model's default
    assert seen["zoconfig_refuses"].startswith("zo_dummy: ")  # the model's validation, in ZOConfig's terms
    assert (seen["recipe"], seen["zoconfig"], seen["header"], seen["replay"]) == (3, 3, 3, 3)
    assert seen["replay_optimizer"] == 2  # and the settings already there still reach the optimizer


def default_definitions(paths, names: set[str]) -> set[tuple[str, str, str]]:
    """(file, function or class, name) wherever a parameter or class field named after a setting (or
    its `zo_` form) gets a default that is neither None nor read from `ZOSettings`."""
    found = set()
    for path in paths:
        relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                positional = a.posonlyargs + a.args
                pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults),
                         *((arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)]
                defaults = [(arg.arg, d) for arg, d in pairs]
            elif isinstance(node, ast.ClassDef):
                defaults = [(s.target.id, s.value) for s in node.body
                            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value]
                defaults += [(s.targets[0].id, s.value) for s in node.body
                             if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)]
            else:
                continue
            for name, value in defaults:
                source = ast.unparse(value)
                if name in names and source != "None" and "ZOSettings" not in source:
                    found.add((relative, node.name, name))
    return found


def setting_names() -> set[str]:
    return {form for name in ZOSettings.model_fields for form in (name, f"zo_{name}")}


def test_each_settings_default_is_written_in_one_definition():
    sources = sorted((ROOT / "zotune").rglob("*.py"))
    found = default_definitions(sources, setting_names())
    defined_by_the_model = {("zotune/settings.py", "ZOSettings", name) for name in ZOSettings.model_fields}
    assert found - defined_by_the_model == set(OTHER_MEANINGS)


def test_a_default_written_out_again_is_found(tmp_path):
    copy = tmp_path / "copy.py"
    copy.write_text("def build(params, *, eps=1e-3, schedule=None):\n    pass\n"
                    "class Args:\n    zo_master_weights: str = 'auto'\n"
                    "def derived(num_directions=ZOSettings.model_fields['num_directions'].default):\n    pass\n")
    assert default_definitions([copy], setting_names()) == {("copy.py", "build", "eps"),
                                                            ("copy.py", "Args", "zo_master_weights")}


def test_a_recipe_refuses_a_setting_the_model_does_not_have(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"config": tiny_config("llama")},
                                    "data": {"task": "lm", "train": {"path": str(path)}}, "zo": {"dummy": 3}}))
    with pytest.raises(RecipeError, match="zo.dummy"):
        load_recipe(str(path))


def test_zoconfig_and_the_optimizer_take_their_defaults_and_help_from_the_model(tmp_path):
    config = ZOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert config.zo_settings() == ZOSettings()
    helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(ZOConfig)}
    for name, info in ZOSettings.model_fields.items():
        assert helps[f"zo_{name}"] == info.description, name
    opt = ZOOptimizer([("w", torch.nn.Parameter(torch.zeros(3)))], lr=0.1)
    default = ZOSettings()
    assert (opt.eps, opt.q, opt.kind, opt.schedule, opt.master_weights) == (
        default.eps, default.num_directions, default.perturbation, default.schedule, default.master_weights)
    assert (opt.rule.name, opt.estimator.name) == (default.rule, default.estimator)


def test_the_optimizer_refuses_a_setting_the_model_does_not_have():
    with pytest.raises(TypeError, match="dummy"):
        ZOOptimizer([("w", torch.nn.Parameter(torch.zeros(3)))], lr=0.1, dummy=3)


# ---------------------------------------------------------------- the bilevel mode on the shared pieces


def scalebio(tmp_path: Path, gradient: str) -> ScaleBiO:
    """A ScaleBiO run over a tiny GPT-2 (LayerNorms named ln_*, biases), every weight training."""
    recipe = Recipe.model_validate({
        "method": "scalebio",
        "model": {"config": tiny_config("gpt2")},
        "data": {"task": "classification", "train": {"path": str(tmp_path / "unused.jsonl")},
                 "verbalizer": {"0": "n", "1": "y"}},
        "bilevel": {"gradient": gradient, "sources": [{"name": "a"}, {"name": "b"}],
                    "validation": {"path": str(tmp_path / "unused.jsonl")}},
        "zo": {"eps": 1e-2, "schedule": "fused"},
        "train": {"weight_decay": 0.1, "output_dir": str(tmp_path / "out")},
    })
    model, _ = load_model(recipe.model, seed=0)
    return ScaleBiO(recipe, model, types.SimpleNamespace(sources=["a", "b"]), has_adapter=False)


def exempt_by_hand(model) -> set[str]:
    """Biases and the weights of LayerNorms: what HF's Trainer exempts from weight decay."""
    return {f"{m_name}.{p_name}" if m_name else p_name for m_name, m in model.named_modules()
            for p_name, _ in m.named_parameters(recurse=False)
            if isinstance(m, torch.nn.LayerNorm) or p_name == "bias"}


@pytest.mark.parametrize("gradient", ["zo", "fo"])
def test_the_bilevel_mode_exempts_from_weight_decay_what_the_trainer_exempts(tmp_path, gradient):
    run = scalebio(tmp_path, gradient)
    run._ensure_optimizers(0)
    expected = exempt_by_hand(run.sets.model)
    assert any(name.endswith("ln_1.weight") for name in expected)  # "bias"/"norm" in the name missed these
    for which, prefix in (("w", ""), ("u", "u.")):
        opt = run.opts[which]
        names = dict((id(p), n) for n, p in run.sets.named(which))
        exempt = {names[id(p)] for group in opt.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
        assert exempt == {prefix + n for n in expected}, which


def test_a_bilevel_checkpoint_cut_short_mid_write_is_not_published(tmp_path, monkeypatch):
    run = scalebio(tmp_path, "zo")
    run._ensure_optimizers(0)
    out = tmp_path / "out"
    run.step = 3
    loop._save(run, out, None)

    def disk_full(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    run.step = 6
    monkeypatch.setattr(loop.torch, "save", disk_full)
    with pytest.raises(OSError):
        loop._save(run, out, None)
    assert [p.name for p in loop._checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "checkpoint-6").exists()
    monkeypatch.undo()
    assert torch.load(out / "checkpoint-3" / loop.STATE_FILE, weights_only=True)["step"] == 3
