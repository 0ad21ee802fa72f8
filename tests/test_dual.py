"""The dual schedule and block offloading, each held to an independent reference.

- dual against `sequential`, MeZO's two forwards, on the CPU and
  (marked cuda) on a GPU;
- offloaded against resident, bit for bit, with the compute-side parameter bytes bounded; on a GPU
  through the offloader's CUDA streams and pinned memory, its residency tracker held to the
  allocator's own counts;
- replay and resume of dual runs against the trained / uninterrupted run, bit for bit, in fp32 and
  in bf16 without master copies;
- a model dual cannot split runs its two signs as two forwards, with a warning, not wrong numbers;
- the perturbed copies alive during a step never exceed the largest module's own parameters.
"""

import logging
import types

import pytest
import torch
from conftest import CORE_ARCHS, DEVICES, TINY_CONFIGS, tiny_causal_lm
from datasets import Dataset
from helpers import counting_dataset, make_trainer, weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from zotune import scratch
from zotune.blocks import find_blocks
from zotune.dual import DualRefused, _split
from zotune.errors import UserError
from zotune.optim import Point, ZOOptimizer
from zotune.replay import optimizer_from_header
from zotune.settings import ZOSettings
from zotune.step_losses import StepLosses
from zotune.trainer import ZOConfig
from zotune.trajectory import read_trajectory

ALL_ARCHS = [*TINY_CONFIGS, "bert_classifier"]
STEPS = dict(max_steps=3, zo_num_directions=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
             weight_decay=0.1)


def build(arch: str, seed: int = 0, dtype=torch.float32):
    if arch != "bert_classifier":
        return tiny_causal_lm(arch, seed, dtype)
    config = AutoConfig.for_model("bert", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def data_for(arch: str) -> Dataset:
    data = counting_dataset()
    if arch == "bert_classifier":
        data = data.map(lambda row, i: {"labels": i % 2}, with_indices=True)
    return data


def train(arch, out, eval_dataset=None, dtype=torch.float32, **overrides):
    model = build(arch, dtype=dtype)
    trainer = make_trainer(model, out, data_for(arch), eval_dataset, **{**STEPS, **overrides})
    trainer.train()
    return model, trainer


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_dual_equals_sequential(arch, device, tmp_path, monkeypatch):
    """Out of place against MeZO's in-place reference: fp32, losses within 1e-5 relative, weights
    within 1e-5 (θ−εz is rounded once out of place, as θ+εz−2εz in place)."""
    monkeypatch.setattr(scratch, "CHUNK_ELEMENTS", 1024)  # the 300-row heads run in chunks of 32 rows
    on = dict(use_cpu=device == "cpu")
    seq_model, seq = train(arch, tmp_path / "seq", zo_schedule="sequential", **on)
    dual_model, dual = train(arch, tmp_path / "dual", zo_schedule="dual", **on)
    assert all(p.device.type == device for p in dual_model.parameters())
    assert dual.zo.schedule == "dual" and dual.losses.one_forward, "fell back"
    seq_records, dual_records = read_trajectory(tmp_path / "seq" / "zo_trajectory.jsonl")[1], \
        read_trajectory(tmp_path / "dual" / "zo_trajectory.jsonl")[1]
    for s, d in zip(seq_records, dual_records, strict=True):
        torch.testing.assert_close(d["loss_plus"], s["loss_plus"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["loss_minus"], s["loss_minus"], rtol=1e-5, atol=1e-6)
    assert_close(weights(dual_model), weights(seq_model))
    assert any(not torch.equal(w, p.cpu()) for w, p in zip(weights(build(arch)).values(), weights(dual_model).values()))


PRECISIONS = {"fp32": (torch.float32, "auto"), "bf16-none": (torch.bfloat16, "none")}
# bf16 without master copies on every core architecture; fp32 on a tied and an untied one
BIT_EXACT_CASES = [(arch, "bf16-none") for arch in CORE_ARCHS] + [("gpt2", "fp32"), ("llama", "fp32")]


@pytest.mark.parametrize("arch,precision", BIT_EXACT_CASES)
def test_replay_of_dual_equals_trained(arch, precision, tmp_path):
    dtype, master_weights = PRECISIONS[precision]
    model, trainer = train(arch, tmp_path, zo_schedule="dual", max_steps=4, dtype=dtype,
                           zo_master_weights=master_weights, learning_rate=1e-2,
                           eval_strategy="steps", eval_steps=2, eval_dataset=data_for(arch))
    header, records = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    assert header["optimizer"]["master_weights"] == master_weights
    base = build(arch, dtype=dtype)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))
    named = dict(base.named_parameters())
    replayed = optimizer_from_header(header, [(n, named[n]) for n in header["params"]])
    for record in records:
        replayed.replay(record)
    replayed.flush()
    for name, p in model.named_parameters():
        assert torch.equal(p, named[name]), name


# bf16 without masters (stochastically rounded updates) on every core architecture; fp32 on one
RESUME_CASES = [(arch, "bf16-none") for arch in CORE_ARCHS] + [("gpt2", "fp32")]


@pytest.mark.parametrize("arch,precision", RESUME_CASES)
def test_resume_of_dual_equals_uninterrupted(arch, precision, tmp_path):
    dtype, master_weights = PRECISIONS[precision]
    common = dict(zo_schedule="dual", max_steps=6, save_strategy="steps", save_steps=3,
                  lr_scheduler_type="linear", zo_master_weights=master_weights, learning_rate=1e-2)
    straight, _ = train(arch, tmp_path, dtype=dtype, **common)
    resumed = build(arch, seed=1, dtype=dtype)  # different init: everything must come from the checkpoint
    make_trainer(resumed, tmp_path, data_for(arch), **{**STEPS, **common}).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# -- offloading --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("schedule", ["dual", "fused"])
def test_offloaded_equals_resident_with_bounded_residency(arch, schedule, device, tmp_path):
    kw = dict(zo_schedule=schedule, eval_strategy="steps", eval_steps=2, eval_dataset=data_for(arch),
              use_cpu=device == "cpu")
    if device == "cuda":
        # an offloaded block's update pass runs on its home (host) weights with the CPU kernels, a
        # resident one's on the GPU with Triton: gaussian z differ there in their last bits, rademacher
        # z are exact everywhere
        kw["zo_perturbation"] = "rademacher"
    resident, res_trainer = train(arch, tmp_path / "resident", **kw)
    offloaded, off_trainer = train(arch, tmp_path / "offload", zo_offload="cpu", **kw)
    assert off_trainer.offloader.cuda == (device == "cuda")  # the streams and pinned memory
    for (name, a), b in zip(resident.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b.to(a.device)), name
    evals = [[log["eval_loss"] for log in t.state.log_history if "eval_loss" in log]
             for t in (res_trainer, off_trainer)]
    assert evals[0] == evals[1]  # evaluation streams the blocks too

    tracker = off_trainer.offloader.tracker
    _, blocks = find_blocks(offloaded)
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    all_bytes = sum(p.numel() * p.element_size() for p in offloaded.parameters())
    assert tracker.resident == all_bytes - sum(p.numel() * p.element_size() for p in blocks.parameters())
    assert tracker.uploads > 0 and tracker.uploaded == 0
    assert tracker.resident < tracker.peak <= tracker.resident + 3 * block_bytes
    for block in blocks:  # between forwards the weights are at home, not in a compute copy
        assert all(p.data_ptr() == home.data_ptr() for p, home in
                   zip(block.parameters(), off_trainer.offloader.blocks[list(blocks).index(block)].homes))


@pytest.mark.parametrize("master_weights", ["auto", "fp32"])
def test_offloaded_bf16_weights_carry_only_the_masters_they_have(master_weights, tmp_path):
    kw = dict(dtype=torch.bfloat16, learning_rate=1e-2, zo_master_weights=master_weights)
    resident, _ = train("llama", tmp_path / "resident", **kw)
    offloaded, trainer = train("llama", tmp_path / "offload", zo_offload="cpu", **kw)
    for (name, a), b in zip(resident.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(build("llama", dtype=torch.bfloat16).parameters(),
                                                        offloaded.parameters()))
    _, blocks = find_blocks(offloaded)
    block = next(iter(blocks)).parameters()
    # auto: one copy of each block, in its dtype; fp32: each trained weight's master travels too
    per_element = 2 + (4 if master_weights == "fp32" else 0)
    assert trainer.offloader.block_bytes() == sum(p.numel() * per_element for p in block)
    masters = [trainer.zo.state[p].get("master") for p in blocks.parameters()]
    assert all(m is None if master_weights == "auto" else m.dtype == torch.float32 for m in masters)


def cuda_peak_of_training(model, out, **overrides):
    """(trainer, the GPU's allocated-bytes peak above what was allocated before it) of training `model` on
    the GPU, the trainer's move of the model included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer = make_trainer(model, out, use_cpu=False, zo_perturbation="rademacher", **overrides)
    trainer.train()
    torch.cuda.synchronize()
    return trainer, torch.cuda.max_memory_allocated() - before


@pytest.mark.cuda
def test_offload_residency_tracker_matches_cuda_allocations(tmp_path):
    """The parameter bytes the tracker counts on the GPU are really there, and nothing else of the blocks is:
    the offloaded peak is at most the tracker's peak plus the resident run's non-parameter working memory
    (activations, perturbed copies), which both runs share. 8 blocks of about 3 MB, so the allocator's
    512-byte rounding of each tensor is small beside them, and at most 3 of them on the GPU at once."""
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "hidden_size": 256, "intermediate_size": 768,
                                              "num_hidden_layers": 8})
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config))
    ones = torch.ones(64, 64, device="cuda")
    ones @ ones  # cuBLAS allocates its workspace once, at its first product: outside the measurements
    _, resident_peak = cuda_peak_of_training(models[0], tmp_path / "resident")
    trainer, offload_peak = cuda_peak_of_training(models[1], tmp_path / "offload", zo_offload="cpu")
    assert trainer.offloader.cuda
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b.to(a.device)), name
    tensors = list(models[0].parameters())
    working = resident_peak - sum(p.numel() * p.element_size() for p in tensors)
    tracker = trainer.offloader.tracker
    assert tracker.peak <= offload_peak <= tracker.peak + working + 512 * len(tensors), (
        tracker.peak, offload_peak, working)
    assert offload_peak < resident_peak - 4 * trainer.offloader.block_bytes()  # 5 of 8 blocks stayed home


def test_offload_with_16_bit_transfer_stays_close_to_resident(tmp_path):
    resident, _ = train("llama", tmp_path / "resident")
    offloaded, trainer = train("llama", tmp_path / "bf16", zo_offload="cpu", zo_offload_transfer_dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in offloaded.parameters())
    assert_close(weights(offloaded), weights(resident), atol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(resident.parameters(), offloaded.parameters()))


# -- what dual cannot do, it refuses ----------------------------------------------------------


def test_split_rule():
    x = torch.arange(8.0).reshape(4, 2)
    (first, second), shared = _split(((x,), {}), batch=2)
    assert torch.equal(first[0][0], x[:2]) and torch.equal(second[0][0], x[2:]) and not shared
    (first, second), shared = _split(((x[:1],), {}), batch=2)
    assert first[0][0] is second[0][0] and shared
    with pytest.raises(DualRefused):
        _split(((torch.zeros(3, 2),), {}), batch=2)


def _mlp_across_time(mlp):
    """Makes an MLP run its down projection on (T, 2B, ·) instead of (2B, T, ·)."""
    def forward(self, x):
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden.transpose(0, 1)).transpose(0, 1)
    mlp.forward = types.MethodType(forward, mlp)


@pytest.mark.parametrize("batch", [4, 3])  # 2B = 8 does not divide T = 12; 2B = 6 does, but along time
def test_unsplittable_model_runs_two_forwards_with_a_warning(batch, tmp_path, caplog):
    models = {}
    for schedule in ("sequential", "dual"):
        models[schedule] = build("llama")
        _mlp_across_time(models[schedule].model.layers[0].mlp)
        with caplog.at_level(logging.WARNING, logger="zotune"):
            trainer = make_trainer(models[schedule], tmp_path / schedule, zo_schedule=schedule,
                                   per_device_train_batch_size=batch, max_steps=2)
            trainer.train()
    assert trainer.zo.schedule == "dual" and not trainer.losses.one_forward
    assert "LlamaForCausalLM cannot run both signs in one doubled forward" in caplog.text
    assert_close(weights(models["dual"]), weights(models["sequential"]))


def two_forwards_without_the_check(monkeypatch) -> None:
    """The dual check on the first batch skipped, its outcome: both signs in two forwards."""
    def settled(self, model, inputs):
        self.checked, self.one_forward = True, False
    monkeypatch.setattr(StepLosses, "check_dual", settled)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_two_forwards_through_the_wrappers_equal_the_doubled_one(arch, tmp_path, monkeypatch):
    """The fallback for models that cannot be split runs the same perturbed copies, one sign per
    forward: only the batch shapes of the unwrapped code differ (1e-6)."""
    models = {}
    for split in (True, False):
        models[split] = build(arch)
        trainer = make_trainer(models[split], tmp_path / str(split), data_for(arch), **STEPS)
        with monkeypatch.context() as patch:
            if not split:
                two_forwards_without_the_check(patch)
            trainer.train()
        assert trainer.zo.schedule == "dual" and trainer.losses.one_forward == split
    assert_close(weights(models[False]), weights(models[True]), atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(build(arch).parameters(), models[False].parameters()))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sliced_directions_in_one_forward_equal_each_direction_on_its_slice(arch, tmp_path, monkeypatch):
    """slice_directions: 3 directions on 3 row slices of one doubled forward (the heads in chunks),
    against the same estimate taken direction by direction, each slice in two one-sign forwards
    (the attention's batch shapes differ: fp32 loss differences of ~1e-7, divided by 2ε, 1e-5)."""
    monkeypatch.setattr(scratch, "CHUNK_ELEMENTS", 1024)
    models = {}
    for one_forward in (True, False):
        models[one_forward] = build(arch)
        trainer = make_trainer(models[one_forward], tmp_path / str(one_forward), data_for(arch),
                               **{**STEPS, "zo_num_directions": 3, "per_device_train_batch_size": 6,
                                  "zo_slice_directions": True})
        with monkeypatch.context() as patch:
            if not one_forward:
                two_forwards_without_the_check(patch)
            trainer.train()
        assert trainer.zo.slice_directions and trainer.losses.one_forward == one_forward
    assert_close(weights(models[False]), weights(models[True]))
    assert any(not torch.equal(a, b) for a, b in zip(build(arch).parameters(), models[True].parameters()))


def test_sliced_directions_each_see_only_their_slice(tmp_path):
    """Direction k's recorded losses are those of the k-th rows at θ ± εz_k, taken in place, MeZO's way."""
    model = build("llama")
    trainer = make_trainer(model, tmp_path, **{**STEPS, "max_steps": 1, "gradient_accumulation_steps": 1,
                                               "per_device_train_batch_size": 4, "zo_slice_directions": True})
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    [record] = read_trajectory(tmp_path / "zo_trajectory.jsonl")[1]
    reference = build("llama").eval()
    opt = ZOOptimizer(list(reference.named_parameters()), lr=0.0, eps=trainer.args.zo_eps, schedule="sequential")
    for k in range(2):
        part = {key: v[2 * k:2 * k + 2] for key, v in batch.items()}
        for coef, recorded in ((opt.eps, record["loss_plus"][k]), (-opt.eps, record["loss_minus"][k])):
            opt.placement.move(Point(record["seed"], k, coef))
            with torch.no_grad():
                assert reference(**part).loss.item() == pytest.approx(recorded, rel=1e-5)
        opt.placement.move(None)


def test_sliced_directions_need_a_row_for_each_direction(tmp_path):
    with pytest.raises(UserError, match="zo.slice_directions .* zo.num_directions=4 .* "
                                        "train.per_device_train_batch_size=2 is too small"):
        make_trainer(build("llama"), tmp_path, zo_num_directions=4, zo_slice_directions=True,
                     per_device_train_batch_size=2)


def test_nested_owners_match_sequential(tmp_path):
    """An MLP that owns a gain and calls children that own weights."""
    models = {}
    for schedule in ("sequential", "dual"):
        model = build("llama")
        mlp = model.model.layers[1].mlp
        mlp.gain = nn.Parameter(torch.ones(model.config.hidden_size))
        plain = mlp.forward
        mlp.forward = lambda x, plain=plain, mlp=mlp: plain(x) * mlp.gain
        models[schedule] = model
        trainer = make_trainer(model, tmp_path / schedule, zo_schedule=schedule, **STEPS)
        trainer.train()
    assert trainer.zo.schedule == "dual"
    assert not torch.equal(models["dual"].model.layers[1].mlp.gain, torch.ones_like(mlp.gain))
    assert_close(weights(models["dual"]), weights(models["sequential"]))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_perturbed_copies_never_exceed_the_largest_module(arch, tmp_path, monkeypatch):
    """The tracker counts every perturbed copy from its allocation until it is freed."""
    monkeypatch.setattr(scratch, "CHUNK_ELEMENTS", 1024)
    model, trainer = train(arch, tmp_path, max_steps=2)
    own = {name: sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
           for name, m in model.named_modules()}
    tracker = trainer.losses.dual.tracker
    assert 0 < tracker.peak <= max(own.values()) and tracker.live == 0
    # the token embedding, the largest module, is never copied whole: only its looked-up rows
    embedding = model.get_input_embeddings()
    assert max(own.values()) == embedding.weight.numel() * embedding.weight.element_size()
    assert tracker.peak < max(own.values())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_find_blocks_finds_the_layers_a_forward_runs(arch):
    model = build(arch)
    called = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: called.append(name))
    model(input_ids=torch.tensor([[1, 2, 3]]))
    name, blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert [n for n in called if n.rsplit(".", 1)[0] == name] == [f"{name}.{i}" for i in range(len(blocks))]
    assert find_blocks(model, called=set(called))[0] == name


def test_the_removed_lazy_update_is_refused_by_name():
    """`lazy_update` (folding each update into the next step's copies) was removed: asking for it names the
    removal; a log that recorded it (`tests/data/trajectories_v0/dual_lazy.jsonl` replays in test_settings)
    holds steps whose updates replay at once with the same numbers."""
    removed = "`lazy_update` was removed on 2026-12-07"
    with pytest.raises(ValueError, match=removed):
        ZOSettings(lazy_update=True)
    with pytest.raises(TypeError, match=removed):
        ZOOptimizer([("w", torch.nn.Parameter(torch.zeros(3)))], lr=0.1, lazy_update=False)
    with pytest.raises(TypeError, match="zo_lazy_update"):
        ZOConfig(output_dir="unused", zo_lazy_update=True)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would hide a wrong perturbation of A
            torch.nn.init.normal_(p, std=0.1)
    return lora


def _quantized_llama(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes quantizes in blocks of 64: rows of 32 would be too short
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "hidden_size": 64, "intermediate_size": 128})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_dual_with_a_lora_adapter_equals_sequential(base, tmp_path):
    models = {}
    for schedule in ("sequential", "dual"):
        model = _lora(tiny_causal_lm("llama") if base == "fp32" else _quantized_llama(tmp_path / schedule))
        with torch.no_grad():  # bitsandbytes repacks 4-bit weights for its CPU kernel at their first use
            model(input_ids=torch.tensor([[1, 2, 3]]))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainer = make_trainer(model, tmp_path / schedule, zo_schedule=schedule, **STEPS)
        trainer.train()
        models[schedule] = model
        assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert trainer.zo.schedule == "dual"
    adapters = {schedule: {n: p for n, p in m.named_parameters() if p.requires_grad} for schedule, m in models.items()}
    assert adapters["dual"] and all("lora_" in n for n in adapters["dual"])
    # the in-place reference drifts by an ulp per step (7e-9 on these weights after one step), and the
    # 4-bit base amplifies that to 5e-6 in the next losses (measured): 1e-4 here, 1e-5 in fp32
    assert_close(adapters["dual"], adapters["sequential"], atol=1e-5 if base == "fp32" else 1e-4)


def test_no_forward_of_a_zo_step_records_autograd(tmp_path, monkeypatch):
    """The probe and the ± forwards run under no_grad: a graph would hold every activation."""
    seen = []
    model = build("llama")
    for module in model.modules():
        module.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    make_trainer(model, tmp_path, zo_schedule="dual", max_steps=2).train()
    assert seen and not any(seen)


def test_remove_restores_every_forward():
    from zotune.dual import DualEngine

    model = build("llama")
    mlp = model.model.layers[1].mlp
    mlp.gain = nn.Parameter(torch.ones(model.config.hidden_size))
    patched = types.MethodType(lambda self, x: self.down_proj(self.up_proj(x)) * self.gain, mlp)
    mlp.forward = patched
    engine = DualEngine(model, ZOOptimizer(model.named_parameters(), lr=0.1, schedule="dual"))
    assert mlp.forward is not patched and "forward" in model.lm_head.__dict__
    engine.remove()
    assert mlp.forward is patched and not any("forward" in m.__dict__ for m in model.modules() if m is not mlp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_second_copy_of_a_pair_is_the_first_reflected_through_theta(dtype):
    """θ − εz taken as 2θ − (θ + εz) is within an ulp of generating z again, θ stays untouched,
    and only the second point of a symmetric pair without a master copy is reflected."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(37, 11).to(dtype))
    theta = p.detach().clone()
    opt = ZOOptimizer([("w", p)], lr=0.1, eps=1e-2, schedule="dual")
    a, b = opt.offsets
    plus, minus = torch.empty_like(p), torch.empty_like(p)
    opt.placement.perturbed("w", p, Point(5, 0, a), plus)
    opt.placement.perturbed("w", p, Point(5, 0, b), minus)
    assert opt.placement.reflects(Point(5, 0, b), p) and not opt.placement.reflects(Point(5, 0, a), p)
    reflected = opt.placement.reflect(p, plus.clone())
    ulp = torch.finfo(dtype).eps * torch.maximum(minus.abs(), theta.abs()).float()
    assert ((reflected.float() - minus.float()).abs() <= ulp).all()
    assert not torch.equal(plus, minus) and torch.equal(p.detach(), theta)
    rows = opt.placement.reflect(p, plus[3:9].clone(), slice(3, 9))
    assert torch.equal(rows, reflected[3:9])
    with_master = ZOOptimizer([("w", p)], lr=0.1, eps=1e-2, schedule="dual", master_weights="fp32")
    assert not with_master.placement.reflects(Point(5, 0, b), p) or dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_causal_lm_loss_equals_the_models_own(dtype, monkeypatch):
    from zotune.dual import causal_lm_loss

    model = build("llama")
    torch.manual_seed(0)
    logits = torch.randn(3, 7, model.config.vocab_size).to(dtype)
    labels = torch.randint(0, model.config.vocab_size, (3, 7))
    labels[0, :3] = -100  # a prompt that is not scored
    expected = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
    monkeypatch.setattr(scratch, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # 5 rows a chunk: 21 rows, ragged
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected, rtol=1e-6, atol=0)
