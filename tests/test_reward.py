"""Reward fine-tuning from generated text (zotune.reward): the population decoded in one batched
`generate` against each member generating alone, the dual schedule against sequential, replay and
resume against the trained run, and every bad reward function's one error line."""

import copy
import math

import pytest
import torch
from conftest import CORE_ARCHS, tiny_causal_lm
from helpers import NOISE, PROMPTS, a_share, length_bonus, prompts_dataset, reward_run, reward_trainer, weights

from zotune.dual import DualEngine
from zotune.errors import UserError
from zotune.models import byte_tokenizer, trainable_parameters
from zotune.noise import noise, seed_for, step_seed
from zotune.optim import ZOOptimizer
from zotune.replay import optimizer_from_header
from zotune.reward.functions import RewardFunctions
from zotune.reward.population import Generation, PopulationRewards, Scorer, generate_ids
from zotune.trajectory import read_trajectory

@pytest.mark.parametrize("temperature", [None, 0.7], ids=["greedy", "sampled"])
@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_the_population_in_one_generate_equals_each_member_generating_alone(arch, temperature):
    """q = 2 directions, both signs, in one batched `generate` under the dual engine, give each row the tokens
    of a copy of the model moved to θ ± εz_k (the reference noise) generating alone: greedy, and sampled
    with the step's sampling seed (the same numbers for every member)."""
    model = tiny_causal_lm(arch).eval()
    named = trainable_parameters(model, [], [])
    eps, ks, s = 0.05, (0, 1), step_seed(0, 3)
    zo = ZOOptimizer(named, lr=0.0, eps=eps, num_directions=2, schedule="dual")
    zo.current_step = 3
    tokenizer = byte_tokenizer()
    batch = tokenizer(PROMPTS[:3], padding=True, padding_side="left", return_tensors="pt")
    generation = Generation(max_new_tokens=6, temperature=temperature)
    population = PopulationRewards(DualEngine(model, zo), zo, Scorer(tokenizer, RewardFunctions(a_share), generation))
    sampling = population.sampling_seed()
    assert (sampling is None) == (temperature is None)
    with torch.no_grad():
        rows = population.population_ids(model, dict(batch), s, ks)
    population.dual.remove()  # the members below run plainly
    members = []
    for coef in (eps, -eps):
        for k in ks:
            member = copy.deepcopy(model)
            with torch.no_grad():
                for (name, _), (_, p) in zip(named, trainable_parameters(member, [], [])):
                    p.add_(noise(seed_for(s, k, name), p.numel(), NOISE).view(p.shape), alpha=coef)
                members += generate_ids(member, batch["input_ids"], batch["attention_mask"], generation,
                                        tokenizer.pad_token_id, tokenizer.eos_token_id, sampling)
    assert rows == members
    assert len({tuple(r) for r in rows}) > len(PROMPTS[:3])  # the members generate differently
    if temperature is not None:  # sampling draws other tokens than greedy decoding
        greedy = generate_ids(member, batch["input_ids"], batch["attention_mask"], Generation(max_new_tokens=6),
                              tokenizer.pad_token_id, tokenizer.eos_token_id)
        assert greedy != members[-3:]


@pytest.mark.parametrize("schedule", ["dual", "fused"])
def test_two_ranks_sharing_the_population_end_where_one_process_ends(launched, tmp_path, schedule):
    """Two gloo ranks of 2 prompts each, each generating for its 2 of the q = 4 directions and exchanging
    the members' rewards, against one process on the 4 prompts: the same records and weights, bit for bit."""
    folder, runs = launched
    model, trainer = reward_run(tmp_path, schedule, per_device_train_batch_size=4)
    trainer.train()
    _, alone = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    _, ranked = read_trajectory(folder / "torchrun" / f"reward-{schedule}" / "zo_trajectory.jsonl")
    assert [(r["loss_plus"], r["loss_minus"], r["g"]) for r in ranked] == \
        [(r["loss_plus"], r["loss_minus"], r["g"]) for r in alone]
    assert len({x for r in alone for x in r["loss_plus"]}) > 1  # the members' rewards differ
    for facts, trained in runs["torchrun"][f"reward-{schedule}"].values():
        assert facts["world"] == 2 and facts["g"] == trainer.zo.last_record["g"]
        assert set(facts["comm_bytes"]) == {2 * 2 * 8}  # this rank's 2 directions, (L+, L−) in float64
        for name, p in weights(model).items():
            assert torch.equal(trained[name], p), name


def test_a_reward_run_replays_resumes_and_dual_agrees_with_sequential(tmp_path):
    trained = {}
    for schedule, extra in (("sequential", {}), ("dual", {}), ("dual-sliced", {"zo_slice_directions": True})):
        model, trainer = reward_trainer(tmp_path / schedule, schedule.split("-")[0], **extra)
        trainer.train()
        trained[schedule] = weights(model)
        header, records = read_trajectory(tmp_path / schedule / "zo_trajectory.jsonl")
        assert all(r["rule"] == "es" and len(r["loss_plus"]) == 2 for r in records)
        named = dict(tiny_causal_lm("llama").named_parameters())
        replayed = optimizer_from_header(header, [(n, named[n]) for n in header["params"]])
        for record in records:
            replayed.replay(record)
        replayed.flush()
        for name, p in trained[schedule].items():
            assert torch.equal(p, named[name]), f"{schedule} replay: {name}"
    assert not all(torch.equal(p, q) for p, q in zip(trained["dual"].values(),
                                                        weights(tiny_causal_lm("llama")).values()))
    for schedule in ("dual", "dual-sliced"):
        for name, p in trained[schedule].items():
            torch.testing.assert_close(p, trained["sequential"][name], rtol=0, atol=1e-5, msg=name)

    saving = dict(save_strategy="steps", save_steps=2)
    reward_trainer(tmp_path / "resumed", "dual", **saving)[1].train()
    resumed, trainer = reward_trainer(tmp_path / "resumed", "dual", seed=1, **saving)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for (name, p), q in zip(trained["dual"].items(), resumed.parameters()):
        assert torch.equal(p, q), f"resume: {name}"


def test_a_step_whose_rewards_are_all_equal_is_skipped_and_counted(tmp_path):
    def constant(completions, **columns):
        return [1.0] * len(completions)

    model, trainer = reward_trainer(tmp_path, "dual", functions=(constant,), max_steps=2)
    before = weights(model)
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in weights(model).items())
    _, records = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    assert [(r["sigma"], r.get("skipped")) for r in records] == [(0.0, True)] * 2
    assert trainer.state.log_history[-2]["skipped_steps"] == 2


def raises(completions, **columns):
    raise KeyError("answer")


def gives_nan(completions, **columns):
    return [math.nan] * len(completions)


def too_few(completions, **columns):
    return [1.0]


def not_numbers(completions, **columns):
    return ["high"] * len(completions)


@pytest.mark.parametrize("function,said", [
    (raises, "raised KeyError: 'answer'"),
    (gives_nan, "returned nan for completion"),
    (too_few, "returned 1 values, not a list of 4 floats"),
    (not_numbers, "returned 'high' \\(str\\), not a number"),
])
def test_a_bad_reward_function_stops_the_run_in_one_line_naming_it_and_the_prompt(function, said, tmp_path):
    """It fails at step 2: the two steps before are in the log, their checksums whole, and checkpoint-2 loads."""
    calls = 0

    def fails_from_step_2(completions, **columns):
        nonlocal calls
        calls += 1
        return function(completions, **columns) if calls > 2 * 2 * 2 else a_share(completions, **columns)

    fails_from_step_2.__qualname__ = function.__name__
    _, trainer = reward_trainer(tmp_path, "dual", functions=(fails_from_step_2,), save_strategy="steps", save_steps=2)
    with pytest.raises(UserError, match=f"reward function '{function.__name__}' on prompt \\d+ .*: {said}"):
        trainer.train()
    _, records = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()


def test_a_trl_grpo_call_switches_with_one_import(tmp_path):
    """trl's GRPOTrainer call, with ZOGRPOConfig/ZOGRPOTrainer: num_generations is the population (2 pairs),
    per_device_train_batch_size counts completions (8 = 2 prompts x 4 members), sampled at trl's
    temperature; the run replays bit for bit."""
    from zotune.integrations.trl import ZOGRPOConfig, ZOGRPOTrainer

    model = tiny_causal_lm("llama")
    args = ZOGRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                        max_completion_length=5, temperature=0.9, max_steps=3, learning_rate=2e-3, zo_eps=5e-2,
                        report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", bf16=False)
    trainer = ZOGRPOTrainer(model=model, reward_funcs=[a_share, length_bonus], args=args,
                            train_dataset=prompts_dataset(), processing_class=byte_tokenizer())
    trainer.train()
    header, records = read_trajectory(tmp_path / "zo_trajectory.jsonl")
    assert [(r["rule"], r["q"], r["schedule"]) for r in records] == [("es", 2, "dual")] * 3
    assert header["reward"] is True  # zotune plot draws the rewards
    assert trainer.args.zo_num_directions == 2 and trainer._train_batch_size == 2  # 8 completions: 2 prompts
    named = dict(tiny_causal_lm("llama").named_parameters())
    replayed = optimizer_from_header(header, [(n, named[n]) for n in header["params"]])
    for record in records:
        replayed.replay(record)
    replayed.flush()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, tiny_causal_lm("llama").state_dict()[n])]
    assert moved
    for name, p in model.named_parameters():
        assert torch.equal(p, named[name]), name


def test_a_reward_recipe_trains_reports_the_mean_reward_and_replays(tmp_path):
    """`zotune train` of data.task reward on a tiny llama: the summary's held-out mean reward before and
    after, and `zotune replay` of its trajectory gives the trained weights."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from helpers import DATA, write_recipe
    from safetensors.torch import load_file

    from zotune.recipe import load_recipe
    from zotune.run import train

    path = write_recipe(tmp_path)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] = {"task": "reward", "template": "Review: {text}\nSentiment:",
                      "train": {"path": str(DATA / "rotten_tomatoes/train.jsonl"), "max_samples": 32},
                      "eval": {"path": str(DATA / "rotten_tomatoes/validation.jsonl"), "max_samples": 8}}
    recipe["reward"] = {"functions": ["test_reward:vowels"], "max_new_tokens": 4, "temperature": 0.8}
    recipe["zo"] = {"rule": "es", "eps": 5e-2, "num_directions": 2, "slice_directions": True}
    path.write_text("# zotune train recipe.yaml\n" + yaml.safe_dump(recipe))
    summary = train(load_recipe(str(path)), str(path))
    assert summary["steps"] == 4 and 0 <= summary["eval_mean_reward_before"] <= 4
    assert summary["eval_mean_reward_after"] is not None
    run = Path(summary["output_dir"])
    assert (run / "zo_plot.png").is_file()
    done = subprocess.run([sys.executable, "-m", "zotune.cli", "replay", str(run), str(run / "zo_trajectory.jsonl"),
                           str(tmp_path / "replayed")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trained, replayed = load_file(run / "model.safetensors"), load_file(tmp_path / "replayed/model.safetensors")
    assert all(torch.equal(trained[n], replayed[n]) for n in trained)


def vowels(completions, **columns):
    """The vowels of each completion (a reward a recipe names by import path)."""
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


@pytest.mark.parametrize("change,said", [
    ({"reward": None}, "data.task reward needs a `reward` section"),
    ({"method": "fo"}, "data.task reward trains with method zo"),
    ({"zo": {"rule": "addax"}}, "zo.rule 'addax' backpropagates a loss on labelled rows"),
    ({"zo": {"objective": "accuracy"}}, "zo.objective 'accuracy': a reward run's objective is its reward functions"),
    ({"reward": {"functions": ["a.b:c", "d.e:f"], "weights": [1.0]}}, "give one weight per function"),
    ({"data": {"task": "sft", "train": {"path": "x.jsonl"}}}, "the `reward` section is for data.task reward"),
])
def test_a_reward_recipe_that_cannot_run_is_refused_naming_why(change, said):
    from pydantic import ValidationError

    from zotune.schema import Recipe

    recipe = {"model": {"name_or_path": "m"}, "data": {"task": "reward", "train": {"path": "p.jsonl"}},
              "reward": {"functions": ["zotune.reward.sentiment:answer"]}, **change}
    with pytest.raises(ValidationError, match=said):
        Recipe.model_validate({k: v for k, v in recipe.items() if v is not None})


def test_a_sharded_reward_run_is_refused_before_anything_is_sharded(tmp_path):
    with pytest.raises(UserError, match="zo.shard='fsdp': ZORewardTrainer generates with whole weights on every rank"):
        reward_trainer(tmp_path, "fused", zo_shard="fsdp")
