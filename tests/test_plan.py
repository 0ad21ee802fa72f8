"""The memory planner: byte counts against real models, offload accounting, activation scaling,
published parameter counts, and the `zotune plan` command."""

import weakref

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_causal_lm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from zotune.blocks import find_blocks
from zotune.cli import app
from zotune.dual import DualEngine, call_halves
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
from zotune.scratch import CHUNK_ELEMENTS

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
    assert plan("llama", master_weights="fp32").compute_master == 0  # fp32 weights never have one
    assert plan("llama", dtype="bfloat16", master_weights="fp32").compute_master == total
    offloaded = plan("llama", dtype="bfloat16", offload=True, master_weights="fp32")
    assert (offloaded.compute_master, offloaded.host_master) == (resident, total - resident)
    assert offloaded.host_params == (total - resident) // 2  # the home copies, in bfloat16
    assert plan("llama", dtype="bfloat16", master_weights="fp32", adapter=True).compute_master == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("schedule", ["dual", "sequential", "fused"])
@pytest.mark.parametrize("setting", ["auto", "fp32", "none"])
def test_master_weights_setting(setting, schedule, dtype):
    """auto: masters only where an in-place schedule displaces 16-bit weights; fp32 forces them on 16-bit
    weights; none and fp32 models never have them; with offloading the blocks' masters are on the host."""
    _, _, total = real_counts(tiny_causal_lm("llama"))  # 4 bytes per element: one master of every weight
    expected = dtype != "float32" and (setting == "fp32" or (setting == "auto" and schedule != "dual"))
    resident = plan("llama", dtype=dtype, schedule=schedule, master_weights=setting)
    assert resident.compute_master == (total if expected else 0)
    assert resident.host_total == 0
    offloaded = plan("llama", dtype=dtype, schedule=schedule, master_weights=setting, offload=True)
    assert offloaded.compute_master + offloaded.host_master == resident.compute_master
    assert (offloaded.host_master > 0) == expected
    assert offloaded.host_total == offloaded.host_params + offloaded.host_master
    assert offloaded.host_params == offloaded.total_param_bytes - offloaded.resident_param_bytes  # one copy per block
    adapter = plan("llama", dtype=dtype, schedule=schedule, master_weights=setting, adapter=True, offload=True)
    assert adapter.compute_master == adapter.host_master == adapter.compute_scratch == 0
    assert adapter.host_params == offloaded.host_params


def test_unknown_master_weights_setting():
    with pytest.raises(ValueError, match="master_weights"):
        plan("llama", master_weights="fp16")


# ---------------------------------------------------------------- scratch


def linear_scratch(out_features: int, in_features: int, size: int, bias: bool = False) -> int:
    """A Linear's perturbed copy, by hand: whole up to 2**22 weight elements, else one chunk of
    2**22 // in_features output rows (and the bias's matching slice)."""
    rows = out_features
    if out_features * in_features > CHUNK_ELEMENTS:
        rows = min(out_features, CHUNK_ELEMENTS // in_features)
    return (rows * in_features + (rows if bias else 0)) * size


def llama_scratch_by_hand(dims: dict, batch: int, seq: int, size: int) -> int:
    d, f, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    head_dim = d // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * head_dim
    return max(
        min(v, 2 * batch * seq) * d * size,  # embed_tokens: the rows the doubled batch looks up
        linear_scratch(d, d, size),  # q_proj, o_proj
        linear_scratch(kv, d, size),  # k_proj, v_proj
        linear_scratch(f, d, size),  # gate_proj, up_proj
        linear_scratch(d, f, size),  # down_proj
        d * size,  # the norms
        linear_scratch(v, d, size),  # lm_head (untied)
    )


LLAMA_SCRATCH = {
    # 2·B·T = 24576 rows of a 50000-row embedding: more than the chunked head's 16384 rows
    "embedding rows": (dict(hidden_size=256, intermediate_size=512, vocab_size=50000), 6, 2048),
    # 32 rows looked up: the head's chunk of 2**22 // 256 = 16384 rows is the largest
    "head chunk": (dict(hidden_size=256, intermediate_size=512, vocab_size=50000), 1, 16),
    # an MLP matrix of 512 x 4096 = 2**21 elements, copied whole
    "whole mlp matrix": (dict(hidden_size=512, intermediate_size=4096, vocab_size=1000), 1, 16),
    # chunked MLP matrices: 512 x 12000 and 12000 x 512 (down_proj: 2**22 // 12000 = 349 rows of 12000)
    "chunked mlp matrix": (dict(hidden_size=512, intermediate_size=12000, vocab_size=1000), 1, 16),
}


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("case", LLAMA_SCRATCH)
def test_scratch_is_the_largest_modules_perturbed_copy(case, dtype, size):
    changes, batch, seq = LLAMA_SCRATCH[case]
    dims = {**TINY_CONFIGS["llama"], **changes}
    p = plan("llama", changes, batch_size=batch, seq_len=seq, dtype=dtype)
    assert p.compute_scratch == llama_scratch_by_hand(dims, batch, seq, size)
    parts = p.compute_params + p.compute_master + p.compute_buffers + p.compute_scratch + p.compute_activations
    assert p.compute_total == parts
    # the same on the compute device when offloading: every module runs there
    assert plan("llama", changes, batch_size=batch, seq_len=seq, dtype=dtype, offload=True).compute_scratch == \
        p.compute_scratch


def test_scratch_of_tied_head_and_conv1d():
    """GPT-2: the tied head is chunked for its own call (the embedding counts its rows separately), and
    a Conv1D is copied whole with its bias, however large."""
    # a tied 50257 x 256 head over 2**22 elements: 16384 rows; 2·B·T = 64 embedding rows; c_fc 256 x 1024 + bias
    p = plan("gpt2", {"n_embd": 256, "vocab_size": 50257}, batch_size=1, seq_len=32)
    assert p.compute_scratch == linear_scratch(50257, 256, 4) == (CHUNK_ELEMENTS // 256) * 256 * 4
    # c_fc and c_proj of 1024 x 4096 = 2**22 weights (+ 4096 and 1024 bias): c_fc is the largest, whole
    p = plan("gpt2", {"n_embd": 1024}, batch_size=1, seq_len=32, dtype="float16")
    assert p.compute_scratch == (1024 * 4096 + 4096) * 2
    # the tied embedding's looked-up rows dominate: 2·4·2048 of 50257 rows
    p = plan("gpt2", {"n_embd": 256, "vocab_size": 50257, "n_positions": 2048}, batch_size=4, seq_len=2048)
    assert p.compute_scratch == 2 * 4 * 2048 * 256 * 4


@pytest.mark.parametrize("schedule", ["sequential", "fused"])
def test_no_scratch_in_place_or_with_an_adapter(schedule):
    assert plan("llama").compute_scratch > 0
    assert plan("llama", schedule=schedule).compute_scratch == 0
    assert plan("llama", adapter=True).compute_scratch == 0


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


def measured_dual_step(model, inputs: dict, monkeypatch, loss_of_outputs=None) -> tuple[int, int]:
    """(peak bytes alive, peak scratch) of zotune's dual forward of `inputs` doubled and each half's
    loss (the model's own, or `loss_of_outputs`), on the CPU, weights and inputs not counted."""
    optimizer = ZOOptimizer(model.named_parameters(), lr=1e-3, schedule="dual")
    # the copies are exact: the noise's temporaries depend on the kernels (none with Triton) and are
    # not part of the estimate; the copies themselves (allocated by the engine) are
    copies = optimizer.placement
    monkeypatch.setattr(copies, "perturbed", lambda name, p, at, out: out.copy_(p.data))
    monkeypatch.setattr(copies, "perturbed_range", lambda name, p, lo, hi, at, out: out.copy_(p.data[lo:hi]))
    monkeypatch.setattr(copies, "perturbed_rows", lambda name, p, rows, at: p.data[rows])
    engine = DualEngine(model, optimizer)
    x = inputs["input_ids"]
    with torch.no_grad():
        model(input_ids=x[:, :8])  # bitsandbytes' CPU path repacks 4-bit weights on their first forward
    held = [*model.parameters(), *model.buffers(), *inputs.values(), *_quant_state_tensors(model)]
    tracker = LivePeak({t.untyped_storage().data_ptr() for t in held if torch.is_tensor(t)})
    def value(model, inputs: dict):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if loss_of_outputs is None:
            return model(**inputs, labels=labels).loss
        return loss_of_outputs(model(**inputs), labels)

    with torch.no_grad(), tracker:
        call_halves(engine, model, (1, 0), lambda: value(model, {**inputs, "use_cache": False}))
    return tracker.peak, engine.tracker.peak


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_activation_estimate_close_to_a_real_dual_forward(arch, attention, monkeypatch):
    """zotune's dual forward of a doubled batch and each half's loss, on the CPU, against the estimate of
    the activations plus the scratch (each module's perturbed copies)."""
    changes = {k: v for k, v in WIDER.items() if k in TINY_CONFIGS[arch]}
    config = config_of(arch, **changes)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    x = torch.randint(config.vocab_size, (2, 128))
    peak, scratch = measured_dual_step(model, {"input_ids": x, "labels": x}, monkeypatch)
    p = plan(arch, changes, seq_len=128, attention=attention)
    assert 0 < scratch <= p.compute_scratch  # an embedding looks up fewer rows than planned
    assert peak == pytest.approx(p.compute_activations + p.compute_scratch, rel=0.15)


# a vocabulary large enough for the head's logits to dominate the step, as in real models
BIG_VOCAB = {"vocab_size": 32000}


def test_classification_plans_the_last_positions_logits_only(monkeypatch):
    """The quickstart's case: a causal LM scores the label words at the last position (the collator
    passes logits_to_keep=1, `zotune.data.label_word_loss`), so the head computes B'·V logits, not
    B'·T·V. Planning it as the LM loss overestimated the quickstart about 2x."""
    from functools import partial

    from zotune.data.tasks import label_word_loss

    seq = 64
    model = tiny_causal_lm_with("llama", **BIG_VOCAB).eval()
    x = torch.randint(256, (2, seq))
    inputs = {"input_ids": x, "labels": torch.tensor([0, 1]), "logits_to_keep": 1}
    peak, _ = measured_dual_step(model, inputs, monkeypatch, partial(label_word_loss, label_word_ids=[10, 20]))
    p = plan("llama", BIG_VOCAB, seq_len=seq, task="classification")
    assert peak == pytest.approx(p.compute_activations + p.compute_scratch, rel=0.15)
    assert p.head_activations == 2 * 2 * 32000 * 4  # 2B rows of V fp32 logits
    as_lm = plan("llama", BIG_VOCAB, seq_len=seq)  # what the planner assumed before
    assert as_lm.compute_activations + as_lm.compute_scratch > 2 * peak


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_evaluation_forward_close_to_the_plan(task):
    """An evaluation (the Trainer's, with the model's own loss; the classification collator's
    logits_to_keep=1) holds a whole eval batch's logits and their fp32 log-softmax: with an eval batch
    twice the train batch, as the quickstart has, more than a dual step of the lm task holds."""
    seq, eval_batch = 64, 8
    model = tiny_causal_lm_with("llama", **BIG_VOCAB).eval()
    x = torch.randint(256, (eval_batch, seq))
    inputs = {"input_ids": x, "labels": x, "use_cache": False}
    if task == "classification":
        inputs.update(labels=None, logits_to_keep=1)
    tracker = LivePeak({t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]})
    with torch.no_grad(), tracker:
        model(**inputs)
    p = plan("llama", BIG_VOCAB, batch_size=eval_batch // 2, seq_len=seq, task=task, eval_batch_size=eval_batch)
    assert tracker.peak == pytest.approx(p.eval_activations, rel=0.15)
    if task == "lm":
        assert p.eval_activations > p.head_activations + p.compute_scratch  # the evaluation is the run's peak
        assert p.compute_activations == p.eval_activations
    assert plan("llama", BIG_VOCAB, seq_len=seq, task=task).eval_activations == 0  # no eval data


# three sizes built from configs, planned and measured on a GPU: name -> (config, batch B, seq T, dtype)
CUDA_CASES = {
    "llama 4L d512 fp32": (config_of("llama", hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=4, intermediate_size=1408, vocab_size=2048),
                           2, 512, "float32"),
    "gpt2 124M bf16": (AutoConfig.for_model("gpt2"), 8, 256, "bfloat16"),
    "opt-1.3b bf16": (known_config("opt-1.3b"), 4, 512, "bfloat16"),
}


def cuda_dual_step(config, batch: int, seq: int, dtype: str) -> tuple[int, int]:
    """(bytes the weights take on the GPU, the peak above them of a dual ZO step: the doubled forward and
    each half's loss, on perturbed copies the Triton kernels make) of a model built on the GPU from `config`."""
    x = torch.randint(config.vocab_size, (batch, seq), device="cuda")
    inputs = {"input_ids": x, "labels": x, "use_cache": False}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    weights = torch.cuda.memory_allocated() - before
    engine = DualEngine(model, ZOOptimizer(model.named_parameters(), lr=1e-3, schedule="dual"))
    with torch.no_grad():
        # warm-up: Triton compiles, cuBLAS takes its workspace
        call_halves(engine, model, (1, 0), lambda: model(**inputs).loss)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        call_halves(engine, model, (2, 0), lambda: model(**inputs).loss)
        torch.cuda.synchronize()
    return weights, torch.cuda.max_memory_allocated() - start


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
def test_plan_matches_the_measured_cuda_peak(case):
    """The allocator's own counts (torch.cuda.max_memory_allocated) against the plan: weights and buffers,
    and the step's activations plus scratch within the CPU checks' 15%."""
    config, batch, seq, dtype = CUDA_CASES[case]
    weights, step = cuda_dual_step(config, batch, seq, dtype)
    p = plan_memory(config, batch_size=batch, seq_len=seq, dtype=dtype, attention="sdpa")
    assert weights == pytest.approx(p.compute_params + p.compute_buffers, rel=0.02)
    assert step == pytest.approx(p.compute_activations + p.compute_scratch, rel=0.15)


def test_recipe_plans_its_task(tiny_recipe):
    classification = load_recipe(tiny_recipe, ["zo.schedule=dual"])
    lm = load_recipe(tiny_recipe, ["zo.schedule=dual", "data.task=lm", "data.verbalizer=null"])
    assert recipe_settings(classification)["task"] == "classification" and recipe_settings(lm)["task"] == "lm"
    assert recipe_settings(lm)["eval_batch_size"] == lm.train.per_device_eval_batch_size
    assert recipe_settings(load_recipe(tiny_recipe, ["data.eval=null"]))["eval_batch_size"] is None
    assert plan_memory(recipe_config(classification), **recipe_settings(classification)).assumptions().count(
        "label words") == 1


def test_soft_capped_logits_are_held_twice(monkeypatch):
    """Gemma 2 and 3 with final_logit_softcapping compute cap·tanh(logits/cap) out of place."""
    capped = {**BIG_VOCAB, "final_logit_softcapping": 30.0}
    model = tiny_causal_lm_with("gemma3_text", **capped).eval()
    x = torch.randint(256, (2, 64))
    peak, _ = measured_dual_step(model, {"input_ids": x, "labels": x}, monkeypatch)
    p = plan("gemma3_text", capped, seq_len=64)
    assert p.head_activations == 2 * (2 * 2 * 64 * 32000 * 4)  # the doubled batch's logits, twice
    assert peak == pytest.approx(p.compute_activations + p.compute_scratch, rel=0.15)


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


def test_recipe_sets_master_weights_and_adapter(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["model.dtype=bfloat16"])  # the tiny recipe: sequential
    settings = recipe_settings(recipe)
    assert (settings["master_weights"], settings["adapter"]) == ("auto", False)
    assert plan_memory(recipe_config(recipe), **settings).compute_master > 0
    recipe = load_recipe(tiny_recipe, ["model.dtype=bfloat16", "zo.schedule=dual", "zo.master_weights=fp32"])
    settings = recipe_settings(recipe)
    assert settings["master_weights"] == "fp32"
    fp32 = plan_memory(recipe_config(recipe), **settings)
    assert fp32.compute_master > 0 and fp32.compute_scratch > 0
    lora = '{peft_type: LORA, r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}'
    recipe = load_recipe(tiny_recipe, ["model.dtype=bfloat16", "zo.master_weights=fp32", f"model.peft={lora}"])
    settings = recipe_settings(recipe)
    assert settings["adapter"] is True
    adapter = plan_memory(recipe_config(recipe), **settings)
    assert adapter.compute_master == adapter.compute_scratch == 0


def test_cli_plans_a_known_model():
    result = CliRunner().invoke(app, ["plan", "--model", "opt-1.3b", "--batch-size", "1", "--seq-len", "2048",
                                      "--dtype", "float16", "--offload", "--transfer-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    for word in ("parameters", "activations", "buffers", "total", "GiB", "compute device", "host", "assumed:",
                 "fp32 master copy", "scratch (perturbed copies)", "master_weights auto"):
        assert word in result.output


def row(output: str, label: str) -> list[str]:
    """The compute-device and host cells of a row of `zotune plan`'s table."""
    line = next(line for line in output.splitlines() if label in line)
    return [cell.strip() for cell in line.split("│")[2:4]]


@pytest.mark.parametrize("setting, master", [(None, False), ("auto", False), ("fp32", True), ("none", False)])
def test_cli_master_weights_option(setting, master):
    args = ["plan", "--model", "opt-1.3b", "--dtype", "bfloat16", "--offload"]
    result = CliRunner().invoke(app, args + (["--master-weights", setting] if setting else []))
    assert result.exit_code == 0, result.output
    compute, host = row(result.output, "fp32 master copy")
    assert (host != "0.00 GiB (0.00 GB)") == master
    assert (compute != "0.00 GiB (0.00 GB)") == master
    assert row(result.output, "scratch (perturbed copies)")[0] != "0.00 GiB (0.00 GB)"  # dual
    assert f"master_weights {setting or 'auto'}" in result.output


def test_cli_master_weights_follows_the_recipe(tiny_recipe):
    result = CliRunner().invoke(app, ["plan", tiny_recipe, "model.dtype=bfloat16", "zo.master_weights=none"])
    assert result.exit_code == 0, result.output
    assert "master_weights none" in result.output
    result = CliRunner().invoke(app, ["plan", tiny_recipe, "model.dtype=bfloat16", "zo.master_weights=none",
                                      "--master-weights", "fp32"])
    assert result.exit_code == 0, result.output
    assert "master_weights fp32" in result.output


def test_cli_plans_a_recipe(tiny_recipe):
    result = CliRunner().invoke(app, ["plan", tiny_recipe, "zo.offload=cpu"])
    assert result.exit_code == 0, result.output
    assert "offload: 2 blocks" in result.output  # the tiny model has only two


@pytest.mark.parametrize("args", [["--model", "opt-17b"], [], ["tiny.yaml", "--model", "opt-1.3b"]])
def test_cli_errors_exit_2_without_traceback(args, tiny_recipe):
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output



NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
              "hidden_dropout": 0.0, "activation_dropout": 0.0}


FIRST_ORDER = {"AdamW": {}, "AdamW + gradient checkpointing": {"checkpointing": True}, "LoRA": {"lora": True},
               "QLoRA": {"lora": True, "checkpointing": True, "nf4": True}}


@pytest.mark.parametrize("method", list(FIRST_ORDER))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_order_rows_close_to_a_real_adamw_step(arch, method, tmp_path):
    """`plan --compare`'s first-order rows against real AdamW steps (forward, backward, update) on the
    CPU: the live bytes beyond the weights, at their peak."""
    from peft import LoraConfig, get_peft_model

    from zotune.plan_compare import compare

    changes = {k: v for k, v in {**WIDER, **NO_DROPOUT}.items() if k in TINY_CONFIGS[arch] or k in NO_DROPOUT}
    config = config_of(arch, **changes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if FIRST_ORDER[method].get("nf4"):
        model = _nf4(model, tmp_path)
    if FIRST_ORDER[method].get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if FIRST_ORDER[method].get("lora"):
        targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(config.vocab_size, (2, 128))
    with torch.no_grad():
        model(input_ids=x[:, :8])  # bitsandbytes' CPU path repacks 4-bit weights on their first forward
    held = [*model.parameters(), *model.buffers(), x, *_quant_state_tensors(model)]
    tracker = LivePeak({t.untyped_storage().data_ptr() for t in held})
    with tracker:
        for _ in range(2):  # the second step is the steady state: AdamW's moments exist during its backward
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    rows = {r.method: r for r in compare(config, batch_size=2, seq_len=128, dtype="float32", attention="sdpa")}
    row = rows[method]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # 4-bit codes as stored
    assert tracker.peak == pytest.approx(row.compute - row.weights, rel=0.25)
    if not FIRST_ORDER[method]:
        assert weights == row.weights
    elif not FIRST_ORDER[method].get("nf4"):
        assert weights == pytest.approx(row.weights, rel=0.02)  # the adapter's own weights, not planned
    else:  # the blocks' codes and scales against NF4's 4.127 bits; on a tiny model the blocks' norms and
        # the adapter (not planned) weigh more than on a real one
        assert weights + sum(t.numel() * t.element_size() for t in _quant_state_tensors(model)) == pytest.approx(
            row.weights, rel=0.1)


def _nf4(model, tmp_path):
    """`model` with its blocks' Linear layers in bitsandbytes NF4 with double quantization (QLoRA's)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32,
                                      llm_int8_skip_modules=["lm_head", "wte", "embed_tokens"])
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                attn_implementation="sdpa").train()


def _quant_state_tensors(model) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' quantization states (absmax, code, nested), if any."""
    found = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            found += [t for t in (state.absmax, state.code) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return found
