"""16-bit weights without master copies: who keeps one, the rounding streams, the drift warning.

The rounding itself (unbiased, bit-equal across implementations) is held to its reference in
tests/test_kernels_out_of_place.py; here the optimizer's use of it.
"""

import pytest
import torch
from conftest import tiny_causal_lm

from zotune import precision
from zotune.optim import ZOOptimizer, Update

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("setting", precision.MASTER_WEIGHTS)
@pytest.mark.parametrize("schedule", ["dual", "sequential", "fused"])
def test_who_keeps_a_master(dtype, setting, schedule):
    model = tiny_causal_lm("llama", dtype=dtype)
    with pytest.warns(UserWarning, match="drift") if (
            dtype != torch.float32 and setting == "none" and schedule != "dual") else _no_warning():
        opt = ZOOptimizer(model.named_parameters(), lr=1e-3, schedule=schedule, master_weights=setting)
    masters = [s["master"] for s in opt.state.values() if "master" in s]
    expected = dtype != torch.float32 and (setting == "fp32" or (setting == "auto" and schedule != "dual"))
    assert len(masters) == (len(list(model.parameters())) if expected else 0)


def test_rules_without_stochastic_rounding_keep_masters_or_refuse():
    model = tiny_causal_lm("llama", dtype=torch.bfloat16)
    opt = ZOOptimizer(model.named_parameters(), lr=1e-3, schedule="dual", rule="adam")
    assert all("master" in s for s in opt.state.values())  # auto
    with pytest.raises(ValueError, match="rule 'adam' has no stochastically rounded"):
        ZOOptimizer(model.named_parameters(), lr=1e-3, schedule="dual", rule="adam", master_weights="none")


def _no_warning():
    import warnings
    from contextlib import contextmanager

    @contextmanager
    def guard():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            yield

    return guard()


def _decay_from(start: torch.Tensor, step: int, wd: float) -> torch.Tensor:
    """One step of pure weight decay (g = 0: z plays no part) from `start`; returns the new weights."""
    w = torch.nn.Parameter(start.clone())
    opt = ZOOptimizer([("w", w)], lr=1.0, schedule="dual", master_weights="none")
    opt.update_param("w", w, Update([0.0], step, 1.0, wd))
    return w.detach()


def test_each_step_rounds_with_its_own_stream():
    """The same sub-ulp decay from the same weights at two steps: a rounding stream reused across
    steps would round down exactly the same elements; replaying a step rounds it the same way."""
    start = torch.full((1 << 14,), 1.5, dtype=torch.bfloat16)  # 1.5·(1 − 2**-9) is 3/8 of an ulp below
    down = [_decay_from(start, step, 2.0**-9) < 1.5 for step in (0, 1)]
    assert not torch.equal(down[0], down[1]), "the rounding stream was reused across steps"
    assert torch.equal(down[0], _decay_from(start, 0, 2.0**-9) < 1.5)
    for moved in down:  # each step rounds down 3/8 of them, within 5 standard errors
        assert abs(moved.float().mean().item() - 0.375) < 5 * (0.375 * 0.625 / moved.numel()) ** 0.5


def test_sub_ulp_updates_move_bf16_weights_in_expectation():
    """Round to nearest would leave every element at 1.0; stochastic rounding moves the mean by the
    exact update within 5 standard errors."""
    n, delta = 1 << 14, 2.0**-10  # an eighth of the ulp of 1.0 (2**-7), a quarter of the one below
    w = torch.nn.Parameter(torch.full((n,), 1.0, dtype=torch.bfloat16))
    opt = ZOOptimizer([("w", w)], lr=1.0, schedule="dual", master_weights="none", perturbation="rademacher")
    from zotune.noise import noise, seed_for, step_seed

    z = noise(seed_for(step_seed(0, 0), 0, "w"), n, "rademacher")
    opt.update_param("w", w, Update([delta], 0, 1.0, 0.0))
    exact = 1.0 - delta * z  # θ − lr·g·z
    error = w.detach().float() - exact
    ulp = torch.where(z > 0, 2.0**-8, 2.0**-7)  # below 1.0 the spacing is halved
    bound = 5 * (ulp.pow(2).mean().sqrt() / 2) / n**0.5  # a rounding error's std is at most ulp/2
    assert error.mean().abs() < bound
    assert (w.detach() != 1.0).any()
