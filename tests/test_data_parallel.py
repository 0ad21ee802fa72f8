"""Data-parallel ZO on torch.distributed, two gloo processes on CPU, against one process.

A rank runs the ± forwards on its shard only; the ranks all-reduce the step's losses (a few
floats, weighted by each shard's examples or tokens) and apply the same seeded update. So two
ranks must end where one process ends on the union of their shards.
"""


import pytest
import torch
from conftest import tiny_causal_lm
from dp_worker import main as run_alone
from dp_worker import parse_run
from helpers import assert_same, assert_same_run, ranks_of
from optimizer_ranks import DP_CASES, ROWS, SHARDED_CASE, run_of, train_rows

from zotune.optim import ZOOptimizer


def test_two_ranks_on_uneven_shards_equal_one_process_on_their_union(launched):
    """The raw optimizer's ranks (tests/optimizer_ranks.py, in conftest's `launched`), each on its shard."""
    (_, rank0), (_, rank1) = launched[1]["torchrun"]["optimizer"].values()
    start = dict(tiny_causal_lm("gpt2").named_parameters())
    for i, case in enumerate(DP_CASES):
        ranks = run_of(rank0, "data", i), run_of(rank1, "data", i)
        assert ranks[0] and ranks[0].keys() == start.keys()
        assert_same(ranks[0], ranks[1], rtol=0, atol=0)  # every rank applied the same update
        assert_same_run(ranks[0], train_rows(case, range(ROWS)), start)


def test_sharded_parameters_equal_unsharded(launched):
    alone = train_rows(SHARDED_CASE, range(ROWS))
    for facts, weights in launched[1]["torchrun"]["optimizer"].values():
        got = run_of(weights, "sharded", 0)
        assert facts["world"] == 2 and got.keys() == alone.keys()
        assert_same(got, alone, rtol=0, atol=0)


def test_sharding_refuses_whole_parameter_directions():
    model = tiny_causal_lm("gpt2")
    with pytest.raises(ValueError, match="sharded parameters need estimator 'spsa'"):
        ZOOptimizer(model.named_parameters(), lr=1e-3, estimator="lowrank", shards={"lm_head.weight": 0})


def test_zotrainer_under_torchrun_equals_one_process(launched, tmp_path):
    # the same worker, in this process without a launcher: one process on the batch both ranks share out
    run_alone(str(tmp_path), **parse_run("one:batch=4")[1])
    (facts, weights), = ranks_of(tmp_path, 1).values()
    (facts0, weights0), (facts1, weights1) = launched[1]["torchrun"]["dual"].values()
    assert facts0["world"] == 2 and not facts0["ddp"]  # no DDP wrapper: there is no backward to sync
    assert facts0["g"] == facts1["g"]
    assert_same(weights0, weights1, rtol=0, atol=0)
    start = dict(tiny_causal_lm("llama").named_parameters())
    assert_same_run(weights0, weights, start)
    # one micro-batch, q = 1: (L+, L−, weight) in float64 per step
    assert facts0["comm_bytes"] and set(facts0["comm_bytes"]) == {3 * 8}
    assert facts["comm_bytes"] == []
    # every rank's rows, gathered: the record holds the projections of the whole batch, as one process's does
    assert facts0["rows"] == facts1["rows"] and facts0["rows"]["row_index"] == facts["rows"]["row_index"]
    for key in ("row_weight", "row_g"):
        torch.testing.assert_close(torch.tensor(facts0["rows"][key]), torch.tensor(facts["rows"][key]), atol=1e-3,
                                   rtol=1e-3)


def test_accelerate_launch_equals_torchrun(launched):
    _, runs = launched
    for rank in (0, 1):
        (facts, weights), torchrun = runs["accelerate"]["dual"][rank], runs["torchrun"]["dual"][rank]
        assert facts["world"] == 2 and not facts["ddp"] and facts["g"] == torchrun[0]["g"]
        assert_same(weights, torchrun[1], rtol=0, atol=0)
