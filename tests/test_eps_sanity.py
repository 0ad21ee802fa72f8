"""A huge `zo.eps` is refused or flagged, with the numbers (zotune.eps), never trained through silently.

The report: with lr 1e-30 (no update at all), eps 1e6 moved the weights by 330% through the in-place
± round trip and eps 1e30 zeroed them; the losses stayed finite and the run exited 0.
"""

import math
import warnings

import pytest
import torch
from conftest import tiny_causal_lm
from typer.testing import CliRunner

from helpers import needs_data, write_recipe
from zotune.cli import app
from zotune.eps import ROUND_TRIP_SAMPLE, ROUND_TRIP_TOLERANCE
from zotune.optim import ZOOptimizer
from zotune.recipe import load_recipe
from zotune.run import build_model
from zotune.trainer import ZOConfig

def train_cli(path, *overrides):
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    return result.exit_code, result.output


@needs_data
@pytest.mark.parametrize("eps", ["1e6", "1e30"])
def test_the_reported_eps_values_are_refused_before_any_weight_loads(tmp_path, eps):
    path = write_recipe(tmp_path, zo={"eps": float(eps), "schedule": "sequential"}, train={"learning_rate": 1e-30})
    code, output = train_cli(path)
    assert code == 2, output
    assert "zo.eps" in output and f"{float(eps):g}" in output and "Traceback" not in output
    assert not (tmp_path / "run").exists()  # refused at validation: nothing ran


def test_zoconfig_refuses_them_too(tmp_path):
    with pytest.raises(ValueError, match=r"zo_eps 1e\+06"):
        ZOConfig(output_dir=str(tmp_path), zo_eps=1e6)


@needs_data
@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_an_eps_that_swamps_the_trainable_weights_is_refused_at_train_start(tmp_path, schedule):
    eps = 0.9  # below the validation bound, over 10x a tiny model's weights (initializer_range 0.02)
    path = write_recipe(tmp_path, zo={"eps": eps, "schedule": schedule}, train={"learning_rate": 1e-30})
    code, output = train_cli(path)
    assert code == 2, output
    message = " ".join(output.split())
    assert "zo.eps" in message and f"= {eps:g}" in message and "Traceback" not in message
    # the RMS it names, against one computed here from the same model
    model = build_model(load_recipe(str(path)))[0]
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    rms = flat.pow(2).mean().sqrt().item()
    assert f"RMS of the trainable weights ({rms:.3g})" in message, message
    assert f"{eps / rms:.3g}x" in message


@needs_data
def test_a_normal_eps_trains_without_a_word(tmp_path):
    path = write_recipe(tmp_path, zo={"eps": 1e-3, "schedule": "sequential"}, train={"max_steps": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, output = train_cli(path)
    assert code == 0, output
    assert not [w for w in caught if "round trip" in str(w.message)]


def step_with_lr_0(model, schedule, eps, master_weights="auto"):
    """One real step with lr 0: the optimizer's own round-trip figure and its warnings."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = ZOOptimizer(model.named_parameters(), lr=0.0, eps=eps, schedule=schedule, master_weights=master_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.estimate(lambda: model(input_ids=ids, labels=ids).loss.item(), 0)
    return opt, [str(w.message) for w in caught if "round trip" in str(w.message)]


@pytest.mark.parametrize("schedule", ["sequential", "fused"])
@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e6), (torch.float32, 1e30), (torch.bfloat16, 1e-2)])
def test_the_round_trip_measurement_matches_the_weights_before_and_after_a_step(schedule, dtype, eps):
    model = tiny_causal_lm("llama", dtype=dtype).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # ZOOptimizer itself has no bound on eps (replay reads any trajectory): only the round trip warns
    opt, warned = step_with_lr_0(model, schedule, eps, master_weights="none")
    opt.step()
    for name, p in model.named_parameters():
        old = before[name].flatten()[:ROUND_TRIP_SAMPLE].float()
        new = p.detach().flatten()[:ROUND_TRIP_SAMPLE].float()
        measured = ((new - old).norm() / old.norm()).item() if old.norm() else 0.0
        p.data.copy_(before[name])  # the optimizer's figure is taken from the same θ
        predicted = opt.placement.round_trip_change(name, p, 0)
        if schedule == "sequential":
            assert predicted == pytest.approx(measured, rel=1e-6, abs=1e-9), name
        elif dtype == torch.float32:  # fused folds the restore into the update pass: the same arithmetic
            assert predicted == pytest.approx(measured, rel=0.05, abs=1e-6), name
        else:  # ... which rounds a 16-bit weight stochastically: the same size of error, not the same bits
            assert measured / 2 <= predicted <= 2 * measured or max(predicted, measured) < 1e-3, name
    worst = max(opt.placement.round_trip_change(n, p, 0) for n, p in model.named_parameters())
    if worst > ROUND_TRIP_TOLERANCE:
        assert len(warned) == 1 and f"eps {eps:g}" in warned[0]
        assert any(f"{opt.placement.round_trip_change(n, p, 0):.3g}" in warned[0] for n, p in model.named_parameters())
    else:
        assert not warned


def test_the_reported_eps_1e6_warns_and_a_normal_one_does_not():
    _, warned = step_with_lr_0(tiny_causal_lm("llama"), "sequential", 1e6)
    assert len(warned) == 1 and "eps 1e+06" in warned[0] and "round trip" in warned[0]
    _, warned = step_with_lr_0(tiny_causal_lm("llama"), "sequential", 1e-3)
    assert not warned


def test_a_16_bit_weight_with_an_fp32_master_comes_back_exactly():
    model = tiny_causal_lm("llama", dtype=torch.bfloat16).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, warned = step_with_lr_0(model, "sequential", 1e6, master_weights="fp32")
    opt.step()
    assert not warned and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(opt.placement.round_trip_change(n, p, 0) == 0 for n, p in model.named_parameters())


def test_swamp_check_is_not_fooled_by_zero_initialised_adapters():
    from zotune.eps import swamp_error, trainable_rms

    zeros = [torch.zeros(8, 8)]
    assert trainable_rms(zeros) == 0 and swamp_error(0.5, 0.0, "zo.eps") is None
    ones = [torch.ones(4), torch.zeros(4)]
    assert trainable_rms(ones) == pytest.approx(math.sqrt(0.5))
    assert swamp_error(1e-3, math.sqrt(0.5), "zo.eps") is None and swamp_error(0.9, math.sqrt(0.5), "zo.eps") is None
    assert swamp_error(0.9, 0.05, "zo.eps") and swamp_error(0.3, 0.05, "zo.eps") is None  # 18x refused, 6x not

