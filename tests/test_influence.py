"""Attribution along the ZO trajectory (`zotune.influence`), held to what it claims.

- Conservation: for every test row, the terms summed over all steps and training rows equal the
  measured change of its loss between the base and the trained model, up to the curvature along
  the steps, which shrinks faster than lr (the references: the two models' own losses).
- Equivalence: the training rows' projections recorded by training equal those recomputed at the
  replayed weights.
- Self-influence: the ZO estimate ranks rows like first-order TracInCP through autograd, and
  better with more directions.
"""

import json

import pytest
import torch
from conftest import CORE_ARCHS, tiny_causal_lm
from datasets import Dataset
from helpers import DATA, counting_dataset, make_trainer, needs_data, write_recipe
from transformers import default_data_collator
from typer.testing import CliRunner

from zotune.cli import app
from zotune.data.collate import INDEX
from zotune.errors import UserError
from zotune.influence.run import STATE, load_attribution_state, save_attribution_state
from zotune.influence.trace import (
    Batch,
    Projector,
    attribute,
    first_order_self_influence,
    self_influence,
    spearman,
)
from zotune.replay import optimizer_from_header
from zotune.trajectory import read_trajectory

STEPS = 6


def trained(arch, out, **overrides):
    model = tiny_causal_lm(arch)
    fields = dict(dict(max_steps=STEPS, zo_eps=1e-3, weight_decay=0.0), **overrides)
    make_trainer(model, out, **fields).train()
    return model


def replaying(arch, out):
    header, records = read_trajectory(out / "zo_trajectory.jsonl")
    base = tiny_causal_lm(arch)
    named = dict(base.named_parameters())
    return base, optimizer_from_header(header, [(n, named[n]) for n in header["params"]]), records


def held_out_rows(n=4, seed=1) -> list[Batch]:
    rows = [dict(r) for r in counting_dataset(n, seed=seed)]
    return [Batch(default_data_collator(rows), list(range(n)))]


def attribution(arch, out, lr):
    trained(arch, out, learning_rate=lr)
    base, zo, records = replaying(arch, out)
    per_step = []
    state = attribute(Projector(base, zo), records, held_out_rows(), out, progress=False,
                      checkpoint=lambda s: per_step.append(torch.tensor(s.attributed())))
    steps = torch.diff(torch.stack([torch.zeros(len(state.before)), *per_step]), dim=0)
    measured = torch.tensor(state.after) - torch.tensor(state.before)
    return measured, torch.tensor(state.attributed()), steps


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_the_terms_add_up_to_the_measured_change_of_each_test_loss(arch, tmp_path):
    # lr 1e-5 and 4e-4: the first small enough that the curvature the terms leave out stays well below the
    # steps (gemma3's error at 2.5e-5 was a third of a typical step on some noise streams), the second large
    # enough that its curvature stands well above float32's resolution of the measured losses (~1e-6 here)
    measured, attributed, steps = attribution(arch, tmp_path / "small", 1e-5)
    error = (attributed - measured).norm()
    typical = steps.norm(dim=1).median()
    assert error < 0.25 * typical, (error, typical)
    # the tolerance catches a dropped or mis-signed step, for every step at least typical in size
    for step in steps[steps.norm(dim=1) >= typical]:
        assert (attributed - step - measured).norm() > 0.25 * typical
        assert (attributed - 2 * step - measured).norm() > 0.25 * typical
    # what the terms leave out is the curvature along the steps: O(lr²), against terms O(lr)
    measured_big, attributed_big, _ = attribution(arch, tmp_path / "big", 4e-4)
    assert error < (attributed_big - measured_big).norm() / 2


def test_the_recorded_training_projections_are_those_recomputed_at_the_replayed_weights(tmp_path):
    data = counting_dataset(16)
    trained("llama", tmp_path, learning_rate=1e-4, train=data, gradient_accumulation_steps=2,
            per_device_train_batch_size=4)
    base, zo, records = replaying("llama", tmp_path)
    projector = Projector(base, zo, eps=zo.eps)  # training's own ε: the projections it recorded
    for record in records:
        # the step's g is the rows' weighted mean, to float32 differences of ~6-unit losses at ε = 1e-3 (~3e-4)
        mean = sum(w * g for w, g in zip(record["row_weight"], record["row_g"][0]))
        assert mean == pytest.approx(record["g"][0], abs=1e-3)
        rows = [dict(data[i]) for i in record["row_index"]]
        batch = Batch({k: v for k, v in default_data_collator(rows).items() if k != INDEX}, record["row_index"])
        [recomputed] = projector.at_step(batch, record["step"])
        torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(record["row_g"][0]), rtol=2e-3, atol=2e-3)
        zo.replay(record)
    assert len(records[0]["row_index"]) == 8 and sorted(records[0]["row_index"]) == list(range(8))


@pytest.mark.parametrize("schedule", ["sequential", "fused"])
def test_in_place_schedules_record_the_same_projections_as_dual(schedule, tmp_path):
    trained("llama", tmp_path / "dual", learning_rate=1e-4)
    trained("llama", tmp_path / schedule, learning_rate=1e-4, zo_schedule=schedule)
    dual = read_trajectory(tmp_path / "dual" / "zo_trajectory.jsonl")[1]
    other = read_trajectory(tmp_path / schedule / "zo_trajectory.jsonl")[1]
    for a, b in zip(dual, other):
        assert a["row_index"] == b["row_index"] and a["row_weight"] == b["row_weight"]
        torch.testing.assert_close(torch.tensor(a["row_g"]), torch.tensor(b["row_g"]), rtol=1e-2, atol=1e-2)


def test_a_run_without_projections_is_refused_naming_why(tmp_path):
    trained("llama", tmp_path, learning_rate=1e-4, zo_rule="momentum")
    base, zo, records = replaying("llama", tmp_path)
    with pytest.raises(UserError, match="step 0 has no per-example projections \\(rule 'momentum'"):
        attribute(Projector(base, zo), records, held_out_rows(), tmp_path, progress=False)


def test_an_interrupted_attribution_resumes_to_the_same_terms(tmp_path):
    trained("llama", tmp_path, learning_rate=1e-4)
    base, zo, records = replaying("llama", tmp_path)
    whole = attribute(Projector(base, zo), records, held_out_rows(), tmp_path, progress=False)
    path, key = tmp_path / STATE, {"test": "held-out", "every": 1}
    base, zo, _ = replaying("llama", tmp_path)
    attribute(Projector(base, zo), records[:3], held_out_rows(), tmp_path, progress=False,
              checkpoint=lambda s: save_attribution_state(path, key, s))  # then interrupted
    assert load_attribution_state(path, {"test": "another", "every": 1}) is None
    base, zo, _ = replaying("llama", tmp_path)
    resumed = attribute(Projector(base, zo), records, held_out_rows(), tmp_path,
                        state=load_attribution_state(path, key), progress=False)
    assert resumed.steps_measured == whole.steps_measured
    torch.testing.assert_close(torch.tensor(resumed.attributed()), torch.tensor(whole.attributed()))
    assert resumed.after == whole.after


def test_self_influence_ranks_like_first_order_tracin_and_better_with_more_directions(tmp_path):
    """The ZO estimate of Σ_c η_c·‖∇ℓ(θ_c; x)‖² against autograd's, per row: the rank correlation
    rises with the directions m (its variance falls as 1/m) and its mean is autograd's (unbiased)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (32, 12), generator=g)
    labels = torch.full((32, 12), 65)
    labels[::4] = torch.randint(3, 250, (8, 12), generator=g)  # every 4th row: noise instead of the token
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": [[1] * 12] * 32})
    trained("llama", tmp_path, learning_rate=2e-2, zo_eps=1e-2, max_steps=20, train=data, zo_include=["lm_head"])
    train = [Batch(default_data_collator([dict(data[i]) for i in range(lo, lo + 8)]), list(range(lo, lo + 8)))
             for lo in range(0, 32, 8)]
    base, zo, records = replaying("llama", tmp_path)
    reference = first_order_self_influence(base, zo, records, train, tmp_path, checkpoints=2, progress=False)
    correlations, means = {}, {}
    for m in (1, 4, 16, 64):
        base, zo, records = replaying("llama", tmp_path)
        scores = self_influence(Projector(base, zo), records, train, tmp_path, checkpoints=2, directions=m,
                                progress=False)
        correlations[m] = spearman([scores[i] for i in range(32)], [reference[i] for i in range(32)])
        means[m] = sum(scores.values()) / sum(reference.values())
    print("spearman by directions:", correlations, "mean ratio:", means)
    assert correlations[1] < correlations[4] < correlations[16] < correlations[64] and correlations[64] > 0.9
    assert means[64] == pytest.approx(1, abs=0.15)


def test_the_example_index_travels_from_the_data_set_to_the_record(tmp_path):
    data = Dataset.from_dict({**counting_dataset(8).to_dict(), INDEX: [100 + i for i in range(8)]})
    trained("llama", tmp_path, learning_rate=1e-4, train=data, max_steps=1)
    [record] = read_trajectory(tmp_path / "zo_trajectory.jsonl")[1]
    assert record["row_index"] == [100 + i for i in range(8)] and sum(record["row_weight"]) == pytest.approx(1)


# -- the command line, on a recipe run over real rows ---------------------------------------------


@needs_data
def test_zotune_influence_writes_attribution_and_self_influence_for_a_run(tmp_path):
    recipe = write_recipe(tmp_path, zo={"eps": 1e-2, "schedule": "dual"},
                          train={"max_steps": 3, "per_device_train_batch_size": 4})
    assert CliRunner().invoke(app, ["train", str(recipe)]).exit_code == 0
    run = tmp_path / "run"
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in
                            map(json.loads, (DATA / "rotten_tomatoes/test.jsonl").read_text().splitlines()[:3])))
    result = CliRunner().invoke(app, ["influence", str(run), "--test", str(test), "--top", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "influence/attribution.jsonl").read_text().splitlines()]
    assert [r["test_index"] for r in rows] == [0, 1, 2]
    for r in rows:  # 3 steps at lr 1e-3: first order explains the change, and the terms are ranked
        assert abs(r["remainder"]) < 0.1 * abs(r["measured_change"]) + 1e-5
        contributions = [p["contribution"] for p in r["proponents"]] + [o["contribution"] for o in r["opponents"]][::-1]
        assert contributions == sorted(contributions) and len(r["proponents"]) <= 2 and len(r["opponents"]) <= 2
    assert not (run / "influence" / STATE).exists()  # finished: nothing left to resume

    (tmp_path / "noisy.json").write_text("[0, 5, 9]")
    result = CliRunner().invoke(app, ["influence", str(run), "--self", "--first-order", "--directions", "2",
                                      "--checkpoints", "2", "--noisy", str(tmp_path / "noisy.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "influence/self_influence_summary.json").read_text())
    assert summary["rows"] == 64 and summary["noisy_rows"] == 3
    ranked = [json.loads(line) for line in (run / "influence/self_influence.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in ranked] == list(range(64))
    assert sorted(r["train_index"] for r in ranked) == list(range(64))
    top = [r for r in ranked[:13] if r["train_index"] in (0, 5, 9)]
    assert summary["recall_top_20pct"] == len(top) / 3 and (run / "influence/self_influence.png").is_file()


@pytest.mark.parametrize("args, message", [([], "give one of --test FILE"), (["--self", "--test", "x"], "give one of"),
                                           (["--self"], "not a zotune run folder")])
def test_zotune_influence_refuses_a_wrong_call_in_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["influence", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
