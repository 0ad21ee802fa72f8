"""bitsandbytes-quantized base models: ZO trains the adapter, the quantized bytes never move. On the CPU,
and (marked cuda) on a GPU, where bitsandbytes loads the base itself and runs its CUDA kernels."""

import json
import sys

import pytest
import torch
import yaml
from conftest import DEVICES, TINY_CONFIGS
from peft import PeftModel
from helpers import counting_dataset, make_trainer, mean_loss
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import zotune.run
from zotune.cli import app
from zotune.errors import UserError
from zotune.models import load_model
from zotune.recipe import load_recipe
from zotune.replay import replaying_optimizer
from zotune.schema import ModelSection
from zotune.trajectory import read_trajectory

bnb = pytest.importorskip("bitsandbytes")

# bitsandbytes quantizes in blocks of 64: rows of 32 would be too short
CONFIG = {"model_type": "llama", **TINY_CONFIGS["llama"], "hidden_size": 64, "intermediate_size": 128}
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
QUANTIZATIONS = {"nf4": {"bits": 4, "quant_type": "nf4"}, "fp4": {"bits": 4, "quant_type": "fp4", "double_quant": True},
                 "int8": {"bits": 8}}
IDS = torch.tensor([[256, *b"it was good"], [256, *b"bad It was!"]])


def quantized(kind="nf4", peft=LORA, unfreeze=()):
    model, _ = load_model(ModelSection(config=CONFIG, quantization=QUANTIZATIONS[kind], peft=peft), unfreeze=unfreeze)
    return model


def quantized_base():
    """The 4-bit base alone (a recipe cannot ask for it: it would have nothing to train)."""
    section = ModelSection(config=CONFIG, quantization=QUANTIZATIONS["nf4"], peft=LORA)
    return load_model(section.model_copy(update={"peft": None}))[0]


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every saved tensor that is not trained: the quantized codes, their scales and quant maps, the frozen floats."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in trained}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def on_device(model, device: str):
    """`model` as loaded, checked to be where the test runs: bitsandbytes puts a base on the GPU when there is one."""
    if device == "cuda":
        assert all(p.device.type == "cuda" for p in model.parameters())
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_4bit_lora_trains_with_zo_and_the_loss_decreases(device, tmp_path):
    model = on_device(quantized("nf4"), device)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    data = counting_dataset(16)
    before = mean_loss(model, data)
    make_trainer(model, tmp_path, data, max_steps=200, learning_rate=3e-2, zo_eps=1e-2,
                 zo_perturbation="rademacher", logging_steps=1000, use_cpu=device == "cpu").train()
    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)


@pytest.mark.cuda
@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_4bit_zo_on_the_gpu_replays_bit_for_bit(perturbation, tmp_path):
    """The trajectory of a run on a 4-bit base on the GPU, replayed onto a fresh load of the same base
    and adapter (checked to be the run's initial weights), gives the trained adapter bit for bit."""
    model, fresh = (on_device(quantized("nf4"), "cuda") for _ in range(2))
    make_trainer(model, tmp_path, max_steps=6, learning_rate=5e-2, zo_eps=1e-2, zo_perturbation=perturbation,
                 use_cpu=False).train()
    header, records = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    replayed = replaying_optimizer(header, fresh, "a fresh load", "the run's trajectory")
    for record in records:
        replayed.replay(record)
    replayed.flush()
    trained, rebuilt = dict(model.named_parameters()), dict(fresh.named_parameters())
    adapter = [n for n, p in trained.items() if p.requires_grad]
    assert adapter and all(torch.equal(trained[n], rebuilt[n]) for n in adapter)
    assert any(not torch.equal(trained[n], p) for n, p in quantized("nf4").named_parameters() if n in adapter)


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_quantized_weights_are_byte_identical_after_training(kind, tmp_path):
    model = quantized(kind)
    quantized_names = [n for n, p in model.named_parameters() if type(p).__module__.startswith("bitsandbytes")]
    assert quantized_names and not any(model.get_parameter(n).requires_grad for n in quantized_names)
    frozen, raw = frozen_state(model), {n: model.get_parameter(n).detach().clone() for n in quantized_names}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    make_trainer(model, tmp_path, max_steps=4, learning_rate=5e-2, zo_eps=1e-2).train()
    for name, tensor in frozen_state(model).items():
        assert torch.equal(tensor, frozen[name]), name
    for name in quantized_names:
        assert torch.equal(model.get_parameter(name), raw[name]), name
    assert all(not torch.equal(adapter[n], p)
               for n, p in model.named_parameters() if n.endswith("lora_B.default.weight"))


def test_unfrozen_norms_train_beside_the_adapter_and_the_quantized_bytes_stay(tmp_path):
    model = quantized("nf4", unfreeze=[r"norm\.weight$"])
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    norms = [n for n in trained if "norm.modules_to_save" in n]
    assert len(norms) == 5  # two per layer and the final norm
    frozen = frozen_state(model)
    make_trainer(model, tmp_path, max_steps=4, learning_rate=5e-2, zo_eps=1e-2).train()
    assert all(not torch.equal(trained[n], model.get_parameter(n)) for n in norms)
    for name, tensor in frozen_state(model).items():
        assert torch.equal(tensor, frozen[name]), name


@pytest.mark.parametrize(("model_type", "pattern", "what"), [
    ("llama", "q_proj", "model.layers.0.self_attn.q_proj.weight, a quantized weight"),
    ("qwen2", r"q_proj\.bias", "model.layers.0.self_attn.q_proj.bias, in a quantized layer (Linear4bit)"),
])
def test_unfreezing_a_quantized_weight_is_a_clear_error(model_type, pattern, what):
    config = {**CONFIG, "model_type": model_type}
    section = ModelSection(config=config, quantization={"bits": 4}, peft=LORA)
    with pytest.raises(UserError) as e:
        load_model(section, unfreeze=[pattern])
    message = str(e.value)
    assert message.startswith(f"params.unfreeze: {pattern!r} matches {what}")
    assert "ZO would perturb quantized codes" in message and "through the adapter" in message


def test_quantization_settings_are_checked(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("some text\n")

    def problems(model: dict) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": model, "data": {"task": "lm", "train": {"path": str(data)}}}))
        with pytest.raises(UserError) as e:
            load_recipe(str(path))
        return str(e.value)

    base = {"config": CONFIG, "peft": LORA}
    assert "model.quantization: `quant_type` is a 4-bit setting" in problems(
        {**base, "quantization": {"bits": 8, "quant_type": "nf4"}})
    assert "model.quantization.bits: 3 is not one of: 4, 8" in problems({**base, "quantization": {"bits": 3}})
    assert "model: `quantization` needs `peft`" in problems({"config": CONFIG, "quantization": {"bits": 4}})


def test_missing_bitsandbytes_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(UserError, match=r"model.quantization: needs the bitsandbytes package .*zotune\[quant\]"):
        quantized("nf4")


# -- export --------------------------------------------------------------------------------


def dequantized_plus_lora(model) -> torch.nn.Module:
    """The reference the merged export must equal, built by hand: every quantized weight dequantized
    by bitsandbytes, plus scale·B·A of its LoRA, plus the trained copies of unfrozen modules."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[name + ".weight"] = weight
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point and ".lora_" not in name and "original_module" not in name:
            state[name.replace(".modules_to_save.default", "")] = param.detach()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            state[name + ".base_layer.weight"] = state[name + ".base_layer.weight"] + delta
    state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()}
    fields = dict(CONFIG)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return reference


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A finished `zotune train` run on a 4-bit base with LoRA and unfrozen norms; (run dir, trained model)."""
    folder = tmp_path_factory.mktemp("qrun")
    rows = [{"text": f"it was {w} {i}", "label": i % 2} for i, w in enumerate(["good", "bad", "fine", "awful"] * 4)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"config": CONFIG, "quantization": {"bits": 4}, "peft": LORA},
        "params": {"unfreeze": [r"norm\.weight$"]},
        "data": {"task": "classification", "train": {"path": str(folder / "rows.jsonl")}, "template": "{text} It was",
                 "verbalizer": {"0": "n", "1": "y"}, "max_length": 32},
        "zo": {"eps": 1e-2, "schedule": "sequential"},
        "train": {"output_dir": str(folder / "run"), "max_steps": 6, "learning_rate": 0.2,
                  "per_device_train_batch_size": 4, "evaluate_before": False},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    built = []
    with pytest.MonkeyPatch.context() as mp:
        original = zotune.run.build_model
        mp.setattr(zotune.run, "build_model", lambda *a: built.append(original(*a)) or built[-1])
        zotune.run.train(load_recipe(str(folder / "recipe.yaml")), str(folder / "recipe.yaml"))
    return folder / "run", built[0][0].eval()


def test_adapter_export_of_a_quantized_run_loads_onto_the_quantized_base(quantized_run, tmp_path):
    run, trained = quantized_run
    out = tmp_path / "adapter"
    done = CliRunner().invoke(app, ["export", str(run), str(out)])
    assert done.exit_code == 0, done.output
    base = quantized_base()
    loaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)


def test_merged_export_of_a_quantized_run_is_the_dequantized_base_plus_the_adapter(quantized_run, tmp_path):
    run, trained = quantized_run
    out = tmp_path / "merged"
    done = CliRunner().invoke(app, ["export", str(run), str(out), "--merge"])
    assert done.exit_code == 0, done.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    reference = dequantized_plus_lora(trained).eval()
    torch.testing.assert_close(logits(merged), logits(reference), rtol=0, atol=1e-5)
    # zotune keeps bitsandbytes on its dequantizing path: the quantized model computes the same function
    torch.testing.assert_close(logits(merged), logits(trained), rtol=0, atol=1e-5)
    plain = quantized_base()
    assert (logits(merged) - logits(plain)).abs().max() > 1e-3  # the adapter and norms moved
