"""ZOTrainer on tiny models: every property is checked against an independent reference."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CORE_ARCHS, tiny_causal_lm
from helpers import NOISE, counting_dataset, make_trainer, mean_loss, weights
from datasets import Dataset
from transformers import default_data_collator

from zotune.noise import noise_like, seed_for, step_seed
from zotune.optim import ZOOptimizer
from zotune.trainer import NonFiniteLossError, ZOConfig, ZOTrainer
from zotune.trajectory import read_trajectory

@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_training_lowers_loss_and_moves_weights(arch, tmp_path):
    data = counting_dataset(16)
    model = tiny_causal_lm(arch)
    before, w0 = mean_loss(model, data), weights(model)
    make_trainer(
        model, tmp_path, data, max_steps=200, learning_rate=2e-3, zo_eps=1e-2, zo_perturbation="rademacher"
    ).train()
    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)
    assert any(not torch.equal(w0[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_sequential_equals_fused(arch, tmp_path):
    models = {}
    for schedule in ("sequential", "fused"):
        models[schedule] = tiny_causal_lm(arch)
        make_trainer(models[schedule], tmp_path / schedule, zo_schedule=schedule, zo_num_directions=2,
                     gradient_accumulation_steps=2, per_device_train_batch_size=4).train()
    # fused only merges passes: each parameter sees the same float operations in the same
    # order, so the two schedules agree bit for bit, not just within tolerance
    for (n, a), b in zip(models["sequential"].named_parameters(), models["fused"].parameters()):
        assert torch.equal(a, b), n
    records = [read_trajectory(tmp_path / s)[1] for s in ("sequential", "fused")]
    assert [r["g"] for r in records[0]] == [r["g"] for r in records[1]]


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_resume_equals_uninterrupted(arch, tmp_path):
    straight = tiny_causal_lm(arch)
    make_trainer(straight, tmp_path / "straight", max_steps=6, lr_scheduler_type="linear").train()

    interrupted = tiny_causal_lm(arch)
    common = dict(max_steps=6, lr_scheduler_type="linear", save_strategy="steps", save_steps=3)
    make_trainer(interrupted, tmp_path / "resumed", **common).train()
    resumed = tiny_causal_lm(arch, seed=123)  # different init: everything must come from the checkpoint
    make_trainer(resumed, tmp_path / "resumed", **common).train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3")
    )
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    header, records = read_trajectory(tmp_path / "resumed")
    assert [r["step"] for r in records] == list(range(6))


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_replay_equals_trained(arch, tmp_path):
    trained = tiny_causal_lm(arch)
    make_trainer(trained, tmp_path, max_steps=5, zo_schedule="fused", gradient_accumulation_steps=2,
                 per_device_train_batch_size=4, weight_decay=0.1, lr_scheduler_type="linear").train()
    header, records = read_trajectory(tmp_path)

    base = tiny_causal_lm(arch)
    named = [(n, p) for n, p in base.named_parameters() if n in set(header["params"])]
    r0 = records[0]
    opt = ZOOptimizer(named, lr=r0["lr"], weight_decay=r0["wd"], no_decay=header["no_decay"], eps=r0["eps"],
                num_directions=r0["q"], perturbation=r0["perturbation"], schedule=r0["schedule"])
    for record in records:
        opt.replay(record)
    for (n, a), b in zip(trained.named_parameters(), base.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_gradient_accumulation_2x4_equals_batch_of_8(arch, tmp_path):
    eps, runs = 1e-2, {}
    for name, (bs, ga) in {"8x1": (8, 1), "4x2": (4, 2)}.items():
        model = tiny_causal_lm(arch)
        make_trainer(model, tmp_path / name, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     zo_eps=eps).train()
        runs[name] = model, read_trajectory(tmp_path / name)[1]
    (m8, rec8), (m4, rec4) = runs["8x1"], runs["4x2"]
    for a, b in zip(rec8, rec4):
        assert a["seed"] == b["seed"] and b["micro_batches"] == 2
        # the two means of 4 and the mean of 8 round differently: a few float32 ulps of the
        # loss, divided by 2ε in g. Summing instead of averaging the micro-batches would be off by |g|.
        tol = 16 * torch.finfo(torch.float32).eps * max(a["loss_plus"]) / (2 * eps)
        assert a["g"] == pytest.approx(b["g"], rel=0, abs=tol)
    for (n, a), b in zip(m8.named_parameters(), m4.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_frozen_parameters_are_bit_unchanged(arch, tmp_path):
    model = tiny_causal_lm(arch)
    w0 = weights(model)
    make_trainer(model, tmp_path, zo_include=[r"\.1\."], zo_exclude=["bias"]).train()
    trained = set(read_trajectory(tmp_path)[0]["params"])
    assert trained and all(".1." in n and "bias" not in n for n in trained)
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(w0[n], p), f"{n} should have been trained"
        else:
            assert torch.equal(w0[n], p), f"{n} is frozen but changed"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2's config has dropout 0.1: the passes must not use it
def test_one_step_matches_the_formula(tmp_path, arch):
    """θ1 = θ0 − lr·g·z with g from two forwards at θ0 ± εz, computed here independently."""
    model, data = tiny_causal_lm(arch), counting_dataset(8)
    reference = tiny_causal_lm(arch)
    eps, lr = 1e-2, 1e-3
    make_trainer(model, tmp_path, data, max_steps=1, learning_rate=lr, zo_eps=eps).train()

    s = step_seed(0, 0)
    z = {n: noise_like(p, seed_for(s, 0, n), NOISE) for n, p in reference.named_parameters()}
    losses = []
    for sign in (1, -1):
        shifted = tiny_causal_lm(arch)
        with torch.no_grad():
            for n, p in shifted.named_parameters():
                p.add_(sign * eps * z[n])
        losses.append(mean_loss(shifted, data))
    g = (losses[0] - losses[1]) / (2 * eps)
    for n, p in reference.named_parameters():
        # g carries the float32 rounding of the two losses (~1e-7 / 2ε); the step itself is ~lr·|g|·|z| ~ 1e-3
        torch.testing.assert_close(model.get_parameter(n), p.detach() - lr * g * z[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule,masters", [("dual", False), ("fused", True)])
def test_bf16_weights_come_back_exactly(schedule, masters, tmp_path):
    """master_weights auto: out of place (dual) θ is never displaced and needs no master; in place
    (fused) the fp32 master brings it back."""
    model = tiny_causal_lm("llama", dtype=torch.bfloat16)
    w0 = weights(model)
    trainer = make_trainer(model, tmp_path, max_steps=3, learning_rate=0.0, zo_schedule=schedule)
    trainer.train()
    # with lr 0 only the ± perturbations could touch the weights, and they must leave no trace
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(w0[n], p), n
    found = [s["master"] for s in trainer.zo.state.values() if "master" in s]
    assert len(found) == (len(w0) if masters else 0)
    assert all(m.dtype == torch.float32 for m in found)


@pytest.mark.parametrize("master_weights", ["fp32", "none"])
def test_bf16_training_resumes_bit_for_bit(master_weights, tmp_path):
    common = dict(max_steps=4, learning_rate=1e-2, zo_master_weights=master_weights)
    straight = tiny_causal_lm("llama", dtype=torch.bfloat16)
    make_trainer(straight, tmp_path / "a", **common).train()
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(),
                                                        tiny_causal_lm("llama", dtype=torch.bfloat16).parameters()))
    resumed = tiny_causal_lm("llama", dtype=torch.bfloat16)
    saving = dict(common, save_strategy="steps", save_steps=2)
    make_trainer(resumed, tmp_path / "b", **saving).train()
    fresh = tiny_causal_lm("llama", dtype=torch.bfloat16)
    trainer = make_trainer(fresh, tmp_path / "b", **saving)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (n, a), b in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    found = [s["master"] for s in trainer.zo.state.values() if "master" in s]
    assert len(found) == (len(list(fresh.parameters())) if master_weights == "fp32" else 0)


def test_nonfinite_losses_skip_and_stop(tmp_path):
    model = tiny_causal_lm("llama")
    w0 = weights(model)
    trainer = make_trainer(model, tmp_path, max_steps=10, zo_max_nonfinite=3)
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: torch.tensor(math.nan)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.train()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)  # only restore drift, no update
    records = read_trajectory(tmp_path)[1]
    assert len(records) == 3 and all(r["g"] is None for r in records)


def test_hf_scheduler_logging_and_eval_work_unchanged(tmp_path):
    model = tiny_causal_lm("gpt2")
    trainer = make_trainer(model, tmp_path, eval_dataset=counting_dataset(8, seed=1), max_steps=6,
                           lr_scheduler_type="linear", warmup_steps=2, eval_strategy="steps", eval_steps=3)
    trainer.train()
    lrs = [r["lr"] for r in read_trajectory(tmp_path)[1]]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[3] > lrs[4] > lrs[5]  # warm-up, then linear decay
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and all({"loss_plus", "loss_minus", "projected_grad"} <= h.keys() for h in logged)
    assert all("grad_norm" not in h for h in logged)
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2


def test_trajectory_lines_are_flushed_records(tmp_path):
    make_trainer(tiny_causal_lm("opt"), tmp_path, max_steps=3).train()
    lines = (tmp_path / "zo_trajectory.jsonl").read_text().splitlines()
    header, steps = json.loads(lines[0]), [json.loads(ln) for ln in lines[1:]]
    assert header["format"].startswith("zotune-trajectory") and header["start_step"] == 0
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert {"step", "seed", "q", "g", "lr", "wd", "eps", "rule"} <= steps[0].keys()


def test_weight_decay_skips_biases_and_norms(tmp_path):
    trainer = make_trainer(tiny_causal_lm("gpt2"), tmp_path, weight_decay=0.1)
    trainer.create_optimizer()
    no_decay = set(trainer.zo.no_decay)
    names = [n for group in trainer.zo.param_groups for n in group["names"]]
    assert no_decay == {n for n in names if n.endswith("bias") or ".ln_" in n}
    decay_group = next(g for g in trainer.zo.param_groups if g["weight_decay"] == 0.1)
    assert "transformer.h.0.attn.c_attn.weight" in decay_group["names"]


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_every_kernel_implementation_trains_the_same(tmp_path, monkeypatch, kind):
    """Triton (interpreted), compiled and eager kernels give the same run, within tolerance.

    rademacher z is exact and every implementation does the same float32 operations, so the
    runs are bit-equal; gaussian z differs in its last bits (log/cos of different libraries).
    That moves the losses by ~1e-7, g by that over 2ε, and the weights by lr·Δg·|z| per step.
    """
    pytest.importorskip("triton")
    runs = {}
    for impl in ("eager", "compiled", "triton"):
        monkeypatch.setenv("ZOTUNE_KERNELS", impl)
        model = tiny_causal_lm("llama")
        make_trainer(model, tmp_path / impl, max_steps=3, zo_perturbation=kind, learning_rate=1e-2,
                     zo_eps=1e-2).train()
        runs[impl] = model, read_trajectory(tmp_path / impl)[1]
    eager_model, eager_records = runs.pop("eager")
    for impl, (model, records) in runs.items():
        losses = [r["loss_plus"] + r["loss_minus"] for r in records]
        expected = [r["loss_plus"] + r["loss_minus"] for r in eager_records]
        if kind == "rademacher":
            assert losses == expected, impl
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager_model.parameters())), impl
        else:
            assert losses == [pytest.approx(e, abs=1e-5) for e in expected], impl
            for a, b in zip(model.parameters(), eager_model.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


class PenalizedTrainer(ZOTrainer):
    """A user's compute_loss override: the loss plus a term that reads a weight outside any forward."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + 10.0 * model.lm_head.weight.sum()


class SmoothedTrainer(ZOTrainer):
    """A user's compute_loss override that reduces the model's outputs its own way (label smoothing)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.2)


def _train_each(tmp_path, runs) -> dict:
    trained = {}
    for label, cls, schedule in runs:
        model = tiny_causal_lm("llama")
        trainer = cls(model=model, args=make_trainer(model, tmp_path / label).args, train_dataset=counting_dataset(),
                      data_collator=default_data_collator)
        trainer.args.zo_schedule = schedule
        trainer.train()
        trained[label] = (weights(model), trainer)
    return trained


def test_a_compute_loss_override_that_reads_the_weights_trains_in_place(tmp_path, caplog):
    """dual's perturbed copies live only inside the modules' forwards, where the override's term
    never looks: the probe must see the term read the weight, train in place (equal to
    sequential), and say so."""
    with caplog.at_level("WARNING", logger="zotune"):
        trained = _train_each(tmp_path, (("default", PenalizedTrainer, "dual"),
                                         ("sequential", PenalizedTrainer, "sequential"), ("plain", ZOTrainer, "dual")))
    assert "PenalizedTrainer reads lm_head.weight outside the module that owns it" in caplog.text
    assert trained["default"][1].zo.schedule == "fused" and trained["plain"][1].zo.schedule == "dual"
    for name, w in trained["sequential"][0].items():
        torch.testing.assert_close(trained["default"][0][name], w, rtol=0, atol=1e-6, msg=name)
    head = "lm_head.weight"
    assert (trained["default"][0][head] - trained["plain"][0][head]).abs().max() > 1e-4  # the term moved the head


def test_a_compute_loss_override_that_reduces_outputs_is_split_by_dual(tmp_path, caplog):
    """An override that only reduces the model's outputs its own way stays out of place, split into
    the doubled forward's halves, and trains on its own loss: equal to sequential, not to the plain loss."""
    with caplog.at_level("WARNING", logger="zotune"):
        trained = _train_each(tmp_path, (("dual", SmoothedTrainer, "dual"),
                                         ("sequential", SmoothedTrainer, "sequential"),
                                         ("plain", ZOTrainer, "dual")))
    dual = trained["dual"][1]
    assert dual.zo.schedule == "dual" and dual.losses.one_forward and "zotune" not in caplog.text
    for name, w in trained["sequential"][0].items():
        torch.testing.assert_close(trained["dual"][0][name], w, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.allclose(w, trained["plain"][0][n], rtol=0, atol=1e-5) for n, w in trained["dual"][0].items())


def test_gradient_clipping_is_refused_rather_than_ignored(tmp_path):
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0: zotune clips no gradient"):
        ZOConfig(output_dir=str(tmp_path), max_grad_norm=1.0, use_cpu=True, report_to="none")


def test_torch_compile_with_dual_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"torch_compile=True with zo_schedule='dual'"):
        ZOConfig(output_dir=str(tmp_path), torch_compile=True, use_cpu=True, report_to="none")


@pytest.mark.parametrize("args", ["plain", "none"])
def test_arguments_that_are_not_a_zoconfig_are_refused_clearly(args, tmp_path):
    from transformers import TrainingArguments

    given = ({"args": TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")}
             if args == "plain" else {})
    with pytest.raises(TypeError, match=r"ZOTrainer needs args=ZOConfig\(\.\.\.\)"):
        ZOTrainer(model=tiny_causal_lm("llama"), train_dataset=counting_dataset(), **given)


def test_the_weights_digest_takes_0_dim_parameters():
    from zotune.trajectory import params_digest

    one, two = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))
    assert params_digest([("a", one)]) != params_digest([("a", two)])
    assert params_digest([("a", one)]) == params_digest([("a", torch.tensor(1.0))])


class ScalarRegression(torch.nn.Module):
    """The shape of transformers' own Trainer test model: y = a·x + b with two 0-dim parameters."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.0)), torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        return (y,) if labels is None else (torch.nn.functional.mse_loss(y, labels), y)


def test_0_dim_parameters_train_in_every_schedule(tmp_path):
    x = torch.linspace(-2, 2, 64)
    data = Dataset.from_dict({"input_x": x.tolist(), "labels": (2 * x + 3).tolist()})
    trained = {}
    for schedule in ("dual", "sequential"):
        model = ScalarRegression()
        make_trainer(model, tmp_path / schedule, data, max_steps=30, learning_rate=1e-2, zo_eps=1e-2,
                     zo_schedule=schedule).train()
        trained[schedule] = (model.a.item(), model.b.item())
    assert trained["dual"] == pytest.approx(trained["sequential"], abs=1e-5)
    assert trained["dual"][0] > 0.1 and trained["dual"][1] > 0.1  # towards a = 2, b = 3


def test_the_step_forwards_keep_no_kv_cache(tmp_path):
    """transformers keeps every layer's keys and values unless told not to; every loss forward of a step is told
    (use_cache=False). A model whose forward takes no use_cache is given none: the 0-dim model above trains."""
    model, asked = tiny_causal_lm("llama"), []
    model.register_forward_pre_hook(lambda module, args, kwargs: asked.append(kwargs.get("use_cache")),
                                    with_kwargs=True)
    make_trainer(model, tmp_path, max_steps=2).train()
    assert asked and set(asked) == {False}


def test_zotune_replay_of_a_drop_in_run_needs_no_tokenizer(tmp_path):
    """A run trained through ZOTrainer from Python: its base folder (save_pretrained, no tokenizer) and its
    log replay with the CLI to the trained weights; replay needs the weights and the log, not a tokenizer."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from zotune.cli import app

    base = tiny_causal_lm("llama")  # (a gpt2 folder would find a GPT-2 tokenizer in the cache by its type)
    base.save_pretrained(tmp_path / "base")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    make_trainer(trained, tmp_path / "run", max_steps=3).train()
    done = CliRunner().invoke(app, ["replay", str(tmp_path / "base"), str(tmp_path / "run"), str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    replayed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (n, a), b in zip(trained.named_parameters(), replayed.parameters()):
        assert torch.equal(a, b), n


def test_the_trainers_keep_no_state_on_their_classes():
    """A class attribute of a ZO trainer is a constant that a subclass may override (a bool, a string, a
    tuple), never per-run state with a class-level default (None, a dict, a list) that an instance shadows."""
    from zotune.integrations import trl
    from zotune.reward.trainer import ZORewardTrainer

    for cls in (ZOTrainer, ZORewardTrainer, trl._ZOStepOfTrl, trl.ZOSFTTrainer, trl.ZODPOTrainer, trl.ZOGRPOTrainer):
        state = {name: value for name, value in vars(cls).items()
                 if not (name.startswith("__") or callable(value) or isinstance(value, (property, bool, str, tuple)))}
        assert not state, f"{cls.__name__} keeps {state} on the class"
