"""The memory planner: byte counts against real models, offload accounting, activation scaling,
published parameter counts, and the `zotune plan` command."""

import weakref

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_causal_lm
from test_cli import tiny  # noqa: F401 (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from zotune.blocks import find_blocks
from zotune.cli import app
from zotune.dual import DualEngine, half_losses, model_loss
from zotune.errors import UserError
from zotune.models import load_model
from zotune.offload import BlockOffloader
from zotune.optim import ZOOptimizer
from zotune.plan import (
    KNOWN_CONFIGS,
    known_config,
    plan_memory,
    recipe_config,
    recipe_settings,
)
from zotune.recipe import load_recipe

# published parameter counts (OPT paper, Meta's Llama 3 model cards)
PUBLISHED = {
    "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9, "opt-6.7b": 6.7e9, "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9,
    "opt-175b": 175e9, "llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9,
}


def config_of(arch: str, **changes):
    return AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **changes})


def plan(arch: str, config_changes=None, **kwargs):
    settings = {"batch_size": 2, "seq_len": 16, "dtype": "float32", **kwargs}
    return plan_memory(config_of(arch, **(config_changes or {})), **settings)


def tiny_causal_lm_with(arch: str, **changes):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_of(arch, **changes))


def real_counts(model) -> tuple[int, list[int], int]:
    """(resident bytes, bytes per block, all bytes) of a real model, each storage once."""
    prefix, blocks = find_blocks(model)
    storages: dict[int, tuple[int, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        storages.setdefault(p.data_ptr(), (p.numel() * p.element_size(), []))[1].append(name)
    per_block = [
        sum(size for size, names in storages.values() if names[0].startswith(f"{prefix}.{i}."))
        for i in range(len(blocks))
    ]
    resident = sum(size for size, names in storages.values() if not names[0].startswith(f"{prefix}."))
    return resident, per_block, sum(size for size, _ in storages.values())


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_parameter_bytes_match_a_real_model(arch, dtype):
    model = tiny_causal_lm(arch, dtype=dtype)
    resident, per_block, total = real_counts(model)
    p = plan(arch, dtype=dtype)
    assert p.block_param_bytes == tuple(per_block)
    assert p.resident_param_bytes == resident
    assert p.total_param_bytes == total == p.compute_params
    assert p.param_count == sum(t.numel() for t in model.parameters())
    naive = sum(t.numel() * t.element_size() for _, t in model.named_parameters(remove_duplicate=False))
    if model.config.tie_word_embeddings:
        assert total < naive  # the tied embedding and head are counted once
    assert p.compute_buffers == sum(b.numel() * b.element_size() for b in model.buffers())


def test_offload_holds_resident_parts_and_three_blocks():
    deeper = {"num_hidden_layers": 6}
    model = tiny_causal_lm_with("llama", **deeper)
    resident, per_block, total = real_counts(model)
    p = plan("llama", deeper, offload=True)
    assert p.compute_params == resident + 3 * per_block[0]
    assert p.host_params == 6 * per_block[0] == total - resident
    assert plan("llama", deeper, offload=True, buffers=2).compute_params == resident + 2 * per_block[0]
    assert plan("llama", offload=True).compute_params == resident + 2 * per_block[0]  # only 2 blocks: both in flight
    # 16-bit transfer: the copies are cast back to the weights' fp32 on arrival; the tensor arriving exists twice
    largest = max(t.numel() for t in model.model.layers[0].parameters())
    half = plan("llama", deeper, offload=True, transfer_dtype="float16")
    assert half.compute_params == p.compute_params + 2 * largest
    assert half.host_params == p.host_params


def test_offload_plan_matches_the_offloaders_residency_tracker():
    """On the CPU a block is written back before the next one is prefetched: two in flight at most."""
    deeper = {"num_hidden_layers": 6}
    model = tiny_causal_lm_with("llama", **deeper)
    offloader = BlockOffloader(model, "cpu")
    with torch.no_grad():
        model(input_ids=torch.randint(300, (2, 16)), use_cache=False)
    assert offloader.tracker.peak == plan("llama", deeper, offload=True, buffers=2).compute_params


def test_master_copy_of_16_bit_weights():
    model = tiny_causal_lm("llama")
    resident, _, total = real_counts(model)  # fp32 bytes = 4 per element
    assert plan("llama").compute_master == 0
    assert plan("llama", dtype="bfloat16").compute_master == total
    offloaded = plan("llama", dtype="bfloat16", offload=True)
    assert (offloaded.compute_master, offloaded.host_master) == (resident, total - resident)
    assert offloaded.host_params == (total - resident) // 2  # the home copies, in bfloat16
    assert plan("llama", dtype="bfloat16", master_copy=False).compute_master == 0


# ---------------------------------------------------------------- activations


def test_dual_doubles_the_batch():
    dual, sequential = plan("llama", batch_size=2), plan("llama", batch_size=4, schedule="sequential")
    assert dual.block_activations == sequential.block_activations
    # the logits of 2B sequences, but each half's loss separately: one B·T·V fp32 more than B alone
    single = plan("llama", batch_size=2, schedule="sequential")
    assert dual.head_activations - single.head_activations == 2 * 16 * TINY_CONFIGS["llama"]["vocab_size"] * 4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3_text"])
def test_quadratic_in_seq_len_only_when_scores_materialise(arch):
    def block(attention, seq):
        return plan(arch, attention=attention, seq_len=seq).block_activations

    for attention, quadratic in (("sdpa", False), ("eager", True), ("math", True)):
        second_difference = block(attention, 4096) - 2 * block(attention, 2048)  # zero for a linear function
        assert (second_difference > 0) == quadratic, attention


class LivePeak(TorchDispatchMode):
    """The peak bytes of tensors alive at once, counting every storage an op creates until it is freed."""

    def __init__(self, ignore):
        super().__init__()
        self.ignore, self.live, self.now, self.peak = ignore, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.ignore and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)


WIDER = {"hidden_size": 128, "n_embd": 128, "intermediate_size": 256, "ffn_dim": 512, "word_embed_proj_dim": 128,
         "head_dim": 32, "n_positions": 256, "max_position_embeddings": 256}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_activation_estimate_close_to_a_real_dual_forward(arch, attention, monkeypatch):
    """zotune's dual forward of a doubled batch and each half's loss, on the CPU, against the estimate."""
    changes = {k: v for k, v in WIDER.items() if k in TINY_CONFIGS[arch]}
    config = config_of(arch, **changes)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    optimizer = ZOOptimizer(model.named_parameters(), lr=1e-3, schedule="dual")
    # the weights stay still: the noise's temporaries depend on the kernels (none with Triton) and
    # are not part of the estimate
    monkeypatch.setattr(optimizer, "touch", lambda params, to: None)
    engine = DualEngine(model, optimizer)
    x = torch.randint(config.vocab_size, (2, 128))
    tracker = LivePeak({t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)})
    with torch.no_grad(), tracker:
        half_losses(engine, model, {"input_ids": x, "labels": x, "use_cache": False}, (1, 0),
                    lambda outputs, labels: model_loss(model, outputs, labels))
    planned = plan(arch, changes, seq_len=128, attention=attention).compute_activations
    assert tracker.peak == pytest.approx(planned, rel=0.15)


# ---------------------------------------------------------------- known configs


@pytest.mark.parametrize("name", KNOWN_CONFIGS)
def test_known_configs_have_the_published_sizes(name):
    p = plan_memory(known_config(name), batch_size=1, seq_len=2048, dtype="float16")
    assert p.param_count == pytest.approx(PUBLISHED[name], rel=0.02)
    assert p.total_param_bytes == 2 * p.param_count


def test_unknown_model_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'opt-175b'"):
        known_config("opt-170b")


# ---------------------------------------------------------------- recipes and the command


@pytest.fixture
def tiny_recipe(tiny):
    """test_cli's tiny recipe and its data, in a temporary working directory: the name to pass."""
    return tiny.name


def test_recipe_plans_its_model(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["zo.schedule=dual", "train.per_device_train_batch_size=4"])
    settings = recipe_settings(recipe)
    assert settings["batch_size"] == 4 and settings["seq_len"] == recipe.data.max_length
    p = plan_memory(recipe_config(recipe), **settings)
    model, _ = load_model(recipe.model)
    resident, per_block, total = real_counts(model)
    assert (p.resident_param_bytes, p.block_param_bytes, p.compute_params) == (resident, tuple(per_block), total)
    assert p.schedule == "dual" and not p.offload


def test_cli_plans_a_known_model():
    result = CliRunner().invoke(app, ["plan", "--model", "opt-1.3b", "--batch-size", "1", "--seq-len", "2048",
                                      "--dtype", "float16", "--offload", "--transfer-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    for word in ("parameters", "activations", "buffers", "total", "GiB", "compute device", "host", "assumed:"):
        assert word in result.output


def test_cli_plans_a_recipe(tiny_recipe):
    result = CliRunner().invoke(app, ["plan", tiny_recipe, "zo.offload=cpu"])
    assert result.exit_code == 0, result.output
    assert "offload: 2 blocks" in result.output  # the tiny model has only two


@pytest.mark.parametrize("args", [["--model", "opt-17b"], [], ["tiny.yaml", "--model", "opt-1.3b"]])
def test_cli_errors_exit_2_without_traceback(args, tiny_recipe):
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output

