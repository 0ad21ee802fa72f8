"""FSDP2-sharded ZO (zotune.fsdp), two gloo processes on CPU, against one process.

Each rank holds a slice of every weight and perturbs and updates it with the z of the whole weight
at the slice's offset; the forwards gather the slices. So:

- given the same batch on every rank, the sharded optimizer ends bit for bit where one process ends;
- `ZOTrainer(zo_shard="fsdp")` under torchrun ends bit for bit where data-parallel ZOTrainer ends
  (the same ranks, whole weights), which equals one process up to the rounding of the loss mean
  (tests/test_data_parallel.py); a resume from a sharded checkpoint ends where the whole run ends;
- a rank holds 1/N of the weights plus the unit it is running, never the whole model.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import FSDP_RUN, tiny_causal_lm
from helpers import WORKER, assert_same, free_port, make_trainer, needs_data, ranks_of, run_spec, write_recipe
from optimizer_ranks import FSDP_CASES, run_of, train_fsdp, uneven_llama
from safetensors.torch import load_file

from zotune.blocks import find_blocks
from zotune.errors import UserError
from zotune.fsdp import SHARDED_MODEL, check_metadata
from zotune.settings import ZOSettings

def unit_bytes(model) -> list[int]:
    """The bytes of each FSDP unit `shard_model` makes, from the unsharded model's shapes."""
    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    units = [size(b) for b in find_blocks(model)[1]]
    units += [size(model.get_input_embeddings()), size(model.get_output_embeddings())]
    return [*units, size(model) - sum(units)]


def test_sharded_optimizer_equals_one_process_bit_for_bit(launched):
    """The raw optimizer's ranks (tests/optimizer_ranks.py, in conftest's `launched`), the same batch on each."""
    ranks = [weights for _, weights in launched[1]["torchrun"]["fsdp-optimizer"].values()]
    start = dict(uneven_llama().named_parameters())
    for i, case in enumerate(FSDP_CASES):
        model = uneven_llama()
        train_fsdp(model, case)
        alone = dict(model.named_parameters())
        assert max((alone[n] - p).abs().max().item() for n, p in start.items()) > 1e-3  # it trained
        for weights in ranks:
            got = run_of(weights, "fsdp", i)
            assert got.keys() == alone.keys()
            assert_same(got, alone, rtol=0, atol=0)


def test_a_rank_holds_its_slices_and_one_gathered_unit(launched):
    units = unit_bytes(uneven_llama())
    total = sum(units)
    for facts, _ in launched[1]["torchrun"]["fsdp-optimizer"].values():
        for i in range(len(FSDP_CASES)):
            slices, peak = facts[f"fsdp/{i}"]["slices"], facts[f"fsdp/{i}"]["peak"]
            assert abs(slices - total / 2) <= 0.02 * total  # 19 + 18 rows: nearly half
            # the root unit (final norm) stays gathered through the forward, one other unit at a time
            assert slices + max(units[:-1]) <= peak <= slices + max(units[:-1]) + units[-1]
            assert peak < 0.8 * total
        assert facts["gathered/0"]["peak"] >= total  # the tracker sees it when units stay gathered


def test_sharding_refuses_the_dual_schedule_naming_both_keys():
    with pytest.raises(ValueError, match="`shard: fsdp`.*`schedule: fused` or `sequential`.*'dual'"):
        ZOSettings(shard="fsdp")


def test_zotrainer_sharding_outside_torch_distributed_says_how_to_launch(tmp_path):
    with pytest.raises(UserError, match="launch with torchrun or accelerate launch"):
        make_trainer(tiny_causal_lm("llama"), tmp_path, zo_shard="fsdp", zo_schedule="fused")


# -- ZOTrainer under torchrun and accelerate launch -------------------------------------------


def test_zotrainer_sharded_equals_data_parallel_bit_for_bit(launched):
    _, runs = launched
    for rank in (0, 1):
        (facts, weights), (dp_facts, dp_weights) = runs["torchrun"]["fsdp"][rank], runs["torchrun"]["fused"][rank]
        assert facts["g"] == dp_facts["g"] and not facts["ddp"]
        assert_same(weights, dp_weights, rtol=0, atol=0)
        assert facts["rows"] == dp_facts["rows"]  # the per-example record gathers the same rows


def test_zotrainer_sharded_rank_holds_half_the_weights_and_one_unit(launched):
    units = unit_bytes(tiny_causal_lm("llama"))
    for facts, _ in launched[1]["torchrun"]["fsdp"].values():
        resident = facts["resident"]
        assert resident["slices"] == sum(units) // 2
        assert resident["peak"] <= resident["slices"] + max(units[:-1]) + units[-1]


def test_zotrainer_sharded_checkpoint_resumes_bit_for_bit(launched):
    out, runs = launched
    checkpoint = out / "torchrun" / "fsdp" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / SHARDED_MODEL).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # accelerate's sharded format
    assert {"optimizer_rank0.pt", "optimizer_rank1.pt"} <= {p.name for p in checkpoint.iterdir()}
    for rank in (0, 1):  # the resumed run (conftest's `launched`) starts from checkpoint-2
        assert_same(runs["torchrun"]["fsdp-resumed"][rank][1], runs["torchrun"]["fsdp"][rank][1], rtol=0, atol=0)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_sharded_checkpoint_whose_metadata_names_code_is_refused(launched, tmp_path):
    """torch.distributed.checkpoint unpickles .metadata without limits: zotune reads it first, allowing
    only the classes torch writes there."""
    import pickle

    metadata = launched[0] / "torchrun" / "fsdp" / "checkpoint-2" / SHARDED_MODEL / ".metadata"
    check_metadata(metadata)  # the real one passes
    forged = tmp_path / ".metadata"
    forged.write_bytes(pickle.dumps({"storage": Payload()}))
    with pytest.raises(UserError, match=r"posix\.system is not checkpoint metadata|os\.system is not"):
        check_metadata(forged)


def test_accelerate_launch_shards_as_torchrun_does(launched):
    _, runs = launched
    for rank in (0, 1):
        assert_same(runs["accelerate"]["fsdp"][rank][1], runs["torchrun"]["fsdp"][rank][1], rtol=0, atol=0)


def test_two_nodes_through_the_c10d_rendezvous_equal_one_node(launched, tmp_path):
    """Two torchrun agents of one process each, meeting at 127.0.0.1 as two machines would."""
    ranks = launched[1]["torchrun"]["fsdp"]
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "zotune-test",
               str(WORKER), str(tmp_path), run_spec("nodes", FSDP_RUN)]
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    for rank in (0, 1):
        facts, weights = ranks_of(tmp_path / "nodes", 2)[rank]
        assert facts["world"] == 2
        assert_same(weights, ranks[rank][1], rtol=0, atol=0)


@needs_data
def test_zotune_train_shards_with_the_recipe_key(tmp_path):
    """`zotune train` under torchrun with `zo.shard: fsdp` writes the whole model, and its trajectory
    replayed in one process on whole weights (`zotune replay`) gives the same weights, bit for bit."""
    from typer.testing import CliRunner

    from zotune.cli import app

    recipe = write_recipe(tmp_path, zo={"eps": 1e-2, "schedule": "fused", "shard": "fsdp"},
                          train={"max_steps": 3, "per_device_train_batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "zotune.cli", "train", str(recipe)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "zo_trajectory.jsonl").read_text().splitlines()[1:]]
    assert [len(r["row_index"]) for r in records] == [4, 4, 4]  # both ranks' rows, gathered
    assert len({i for r in records for i in r["row_index"]}) == 12  # no row seen twice: 2 ranks' worth arranged
    result = CliRunner().invoke(app, ["replay", str(run), str(run / "zo_trajectory.jsonl"), str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert_same(load_file(run / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors"),
                rtol=0, atol=0)
