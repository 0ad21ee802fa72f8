"""ScaleBiO mode (method: scalebio) on a synthetic version of the paper's label-noise check.

Six sources are slices of one synthetic task (the label is the last character: p -> 1, q -> 0),
with labels flipped at rates 0, 0, 0.2, 0.4, 1, 1. A tiny random llama learns the mixture
weights against a clean validation set. Everything is seeded; nothing is compared with
stored numbers.
"""

import json
import random
import shutil

import pytest
import torch

from zotune.bilevel import lambda_gradient
from zotune.bilevel.data import BilevelData
from zotune.bilevel.loop import ScaleBiO, run_scalebio
from zotune.errors import UserError
from zotune.models import load_model
from zotune.recipe import RecipeError, load_recipe
from zotune.run import train as zotune_train
from zotune.schema import Recipe

from conftest import tiny_config

RATES = {"clean_a": 0.0, "clean_b": 0.0, "noisy_20": 0.2, "noisy_40": 0.4, "flipped_a": 1.0, "flipped_b": 1.0}
ROWS = 64  # per source


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they bring
    yield
    torch.set_num_threads(threads)


def write_rows(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = i % 2
            text = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))) + ("p" if label else "q")
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def scenario(tmp_path, gradient="fo", **overrides) -> dict:
    """The synthetic label-noise scenario as a recipe dict; overrides are dotted keys."""
    write_rows(tmp_path / "train.jsonl", len(RATES) * ROWS, 0)
    write_rows(tmp_path / "val.jsonl", 64, 1)
    sources = [{"name": n, "skip": ROWS * i, "max_samples": ROWS, "label_noise": r}
               for i, (n, r) in enumerate(RATES.items())]
    recipe = {
        "method": "scalebio",
        "model": {"config": {**tiny_config("llama"), "max_position_embeddings": 64}},
        "data": {"task": "classification", "train": {"path": str(tmp_path / "train.jsonl")}, "template": "{text}",
                 "verbalizer": {"0": "n", "1": "y"}, "balanced": True, "max_length": 16,
                 "eval": {"path": str(tmp_path / "val.jsonl")}},
        "params": {"include": ["norm"]},
        "bilevel": {"sources": sources, "validation": {"path": str(tmp_path / "val.jsonl")}, "gradient": gradient,
                    "alpha": 1.0, "lr_lambda": 0.05, "per_source_batch_size": 4, "validation_batch_size": 8,
                    "mixture_size": 300, "plot": False},
        "zo": {"eps": 1e-2, "schedule": "fused"},
        "train": {"max_steps": 100, "learning_rate": 1e-2, "output_dir": str(tmp_path / "out"), "logging_steps": 50,
                  "evaluate_before": False},
    }
    for key, value in overrides.items():
        node, parts = recipe, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe


def run(recipe_dict) -> tuple[dict, Recipe]:
    recipe = Recipe.model_validate(recipe_dict)
    model, tokenizer = load_model(recipe.model, seed=recipe.train.seed)
    return run_scalebio(recipe, model, tokenizer), recipe


def train(recipe_dict) -> dict:
    """Through `zotune train`'s path: the run folder claimed, the checkpoint to resume resolved and checked."""
    return zotune_train(Recipe.model_validate(recipe_dict), "test")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lambda_gradient_is_the_softmax_chain_rule():
    torch.manual_seed(0)
    lam = torch.randn(5, dtype=torch.float64, requires_grad=True)
    m_w, m_u = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    (3.0 * (torch.softmax(lam, 0) * (m_w - m_u)).sum()).backward()
    assert torch.allclose(lambda_gradient(lam.detach(), m_w, m_u, 3.0), lam.grad)


@pytest.mark.parametrize("gradient", ["fo", "zo"])
def test_weights_rank_sources_by_label_noise(tmp_path, gradient):
    summary, recipe = run(scenario(tmp_path, gradient))
    out = tmp_path / "out"
    final = json.loads((out / "mixture_weights_final.json").read_text())
    p = final["weights"]
    # (a) sources rank by corruption: every source of a cleaner level above every source of a noisier one
    levels = sorted(set(RATES.values()))
    for cleaner, noisier in zip(levels, levels[1:]):
        low = min(p[n] for n, r in RATES.items() if r == cleaner)
        high = max(p[n] for n, r in RATES.items() if r == noisier)
        assert low > high, (cleaner, noisier, p)
    assert final["ranking"][0].startswith("clean")
    # (b) the fully corrupted sources hold less than half their uniform share
    corrupted = [n for n, r in RATES.items() if r == 1.0]
    assert sum(p[n] for n in corrupted) < 0.5 * len(corrupted) / len(RATES), p

    history = read_jsonl(out / "mixture_weights.jsonl")
    assert [h["step"] for h in history] == list(range(101))
    assert all(abs(sum(h["weights"].values()) - 1) < 1e-4 for h in history)
    assert history[-1]["weights"] == pytest.approx(p, abs=1e-6)
    mixture = read_jsonl(out / "mixture.jsonl")
    assert len(mixture) == 300 and set(mixture[0]) == {"text", "label", "source"}
    clean_rows = sum(r["source"].startswith("clean") for r in mixture)
    uniform = read_jsonl(out / "mixture_uniform.jsonl")
    assert clean_rows > sum(r["source"].startswith("clean") for r in uniform)
    # flipped rows keep their flipped labels: the mixture is what the weights were learned on
    flipped = [r for r in uniform if r["source"] == "flipped_a"]
    assert flipped and all(r["label"] != (r["text"][-1] == "p") for r in flipped)


def test_zo_source_means_come_from_the_pm_passes(tmp_path):
    """(ℓ⁺ + ℓ⁻)/2 per source equals the loss at θ up to O(ε²): checked against exact forwards at θ."""
    recipe = Recipe.model_validate(scenario(tmp_path, "zo", **{"zo.eps": 1e-3}))
    model, tokenizer = load_model(recipe.model, seed=0)
    run = ScaleBiO(recipe, model, BilevelData(recipe, tokenizer, model), has_adapter=False)
    batch, ids = run.data.train_batch(0)
    with torch.no_grad():
        exact = {w: run.source_means(run.data.per_sample_losses(lambda x: run.sets.forward(w, x), batch), ids)
                 for w in ("w", "u")}
    logged = run.train_step()
    for which in ("w", "u"):
        got = torch.tensor(logged[f"m_{which}"], dtype=torch.float64)
        assert torch.allclose(got, exact[which].double(), atol=2e-4), which
    spread = exact["w"].max() - exact["w"].min()
    assert spread > 1e-2  # the sources do differ, so the check above means something


@pytest.mark.parametrize("gradient, copies, lisa", [
    ("fo", "adapters", {"layers": 1, "interval": 2}),
    ("zo", "adapters", {"layers": 1, "interval": 2}),
    ("zo", "param_sets", None),
])
def test_resume_equals_uninterrupted(tmp_path, gradient, copies, lisa):
    def recipe(out, steps, **extra):
        overrides = {"train.max_steps": steps, "train.output_dir": str(out), "bilevel.copies": copies,
                     "bilevel.lisa": lisa, "bilevel.warmup_steps": 1, "bilevel.mixture_size": 20,
                     "train.save_strategy": "steps", "train.save_steps": 3, **extra}
        if copies == "adapters":
            overrides.update({"model.peft": {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                             "target_modules": ["q_proj", "v_proj"]}, "params.include": []})
        return scenario(tmp_path, gradient, **overrides)

    straight, _ = run(recipe(tmp_path / "a", 7))
    # interrupted after step 5; the last checkpoint is step 3, so steps 4-5 are redone
    train(recipe(tmp_path / "b", 5))
    shutil.rmtree(tmp_path / "b" / "checkpoint-5")
    train(recipe(tmp_path / "b", 7, **{"train.resume_from_checkpoint": "latest"}))
    a = torch.load(tmp_path / "a" / "checkpoint-7" / "bilevel_state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint-7" / "bilevel_state.pt", weights_only=False)
    assert torch.equal(a["lambda"], b["lambda"]) and not torch.equal(a["lambda"], torch.zeros_like(a["lambda"]))
    for which in ("w", "u"):
        assert a[which].keys() == b[which].keys()
        for name in a[which]:
            assert torch.equal(a[which][name], b[which][name]), (which, name)
    assert read_jsonl(tmp_path / "a" / "mixture_weights.jsonl") == read_jsonl(tmp_path / "b" / "mixture_weights.jsonl")
    # w and u moved apart: the test would notice a set that never trains
    assert any(not torch.equal(a["w"][n], a["u"][m]) for n, m in zip(a["w"], a["u"]))


def test_resume_takes_only_this_runs_checkpoints_and_names_a_damaged_one(tmp_path):
    """The run-identity and damage checks of `zotune train`, for the bilevel mode's checkpoints."""
    def recipe(out, steps, **extra):
        return scenario(tmp_path, "zo", **{"train.max_steps": steps, "train.output_dir": str(out),
                                           "bilevel.mixture_size": 20, "train.save_strategy": "steps",
                                           "train.save_steps": 2, **extra})

    train(recipe(tmp_path / "mine", 4))
    train(recipe(tmp_path / "other", 6))
    shutil.copytree(tmp_path / "other" / "checkpoint-6", tmp_path / "mine" / "checkpoint-6")  # another run's
    with pytest.raises(UserError, match="a checkpoint of another run"):
        train(recipe(tmp_path / "mine", 8, **{"train.resume_from_checkpoint": str(tmp_path / "mine" / "checkpoint-6")}))
    state = tmp_path / "mine" / "checkpoint-4" / "bilevel_state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # cut short, as a crash mid-write would leave it
    with pytest.raises(UserError, match=r"checkpoint-4 is damaged \(bilevel_state.pt: .*resume from the last "
                                        r"intact one: train.resume_from_checkpoint=.*checkpoint-2"):
        train(recipe(tmp_path / "mine", 8, **{"train.resume_from_checkpoint": "latest"}))  # skips checkpoint-6


def test_param_sets_and_full_copies_give_the_same_run(tmp_path):
    finals = {}
    for copies in ("param_sets", "full_copies"):
        run(scenario(tmp_path, "fo", **{"train.max_steps": 5, "bilevel.copies": copies,
                                       "train.output_dir": str(tmp_path / copies)}))
        finals[copies] = json.loads((tmp_path / copies / "mixture_weights_final.json").read_text())
    assert finals["param_sets"]["lambda"] == pytest.approx(finals["full_copies"]["lambda"], abs=1e-9)
    assert any(abs(v) > 1e-4 for v in finals["param_sets"]["lambda"])


def test_lisa_trains_only_the_sampled_blocks_and_releases_their_state(tmp_path):
    recipe = Recipe.model_validate(scenario(tmp_path, "fo", **{"params.include": [], "bilevel.lisa":
                                                             {"layers": 1, "interval": 3}}))
    model, tokenizer = load_model(recipe.model, seed=0)
    run = ScaleBiO(recipe, model, BilevelData(recipe, tokenizer, model), has_adapter=False)
    switched = False
    for _ in range(9):
        block = run.lisa.blocks_at(run.step)[0]
        before = {n: p.detach().clone() for n, p in run.sets.w}
        run.train_step()
        for name, p in run.sets.w:
            in_block = name.startswith("model.layers.")
            moved = not torch.equal(before[name], p)
            if in_block:
                assert moved == name.startswith(f"model.layers.{block}."), name
            else:
                assert moved, name  # embeddings, final norm and head always train
        state_names = {n for n, p in run.sets.w if p in run.opts["w"].state}
        assert not any(n.startswith(f"model.layers.{1 - block}.") for n in state_names)
        switched |= block != run.lisa.blocks_at(0)[0]
    assert switched


def test_bad_bilevel_sections_name_their_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "t.jsonl", 8, 0)
    base = ("method: scalebio\nmodel:\n  config: {model_type: llama}\ndata:\n  task: classification\n"
            "  train: {path: t.jsonl}\n")
    cases = {
        "bilevel:\n  sources: [{name: a}, {name: a}]\n  validation: {path: t.jsonl}\n":
            "tiny.yaml:8: bilevel.sources: source names must differ; 'a' is used twice",
        "bilevel:\n  sources: [{name: a}, {name: b}]\n  validation: {path: t.jsonl}\n  alpha_schedule: linear\n":
            "tiny.yaml:7: bilevel: `alpha_schedule: linear` needs `alpha_start`",
        "bilevel:\n  sources: [{name: a}, {name: b}]\n  validation: {path: t.jsonl}\n  gradiant: zo\n":
            "tiny.yaml:10: bilevel.gradiant: unknown key; did you mean 'gradient'?",
        "": "tiny.yaml:1: (recipe): method scalebio needs a `bilevel` section (sources, validation, ...)",
    }
    for extra, message in cases.items():
        (tmp_path / "tiny.yaml").write_text(base + extra)
        with pytest.raises(RecipeError) as e:
            load_recipe("tiny.yaml")
        assert e.value.problems == [message]
    (tmp_path / "tiny.yaml").write_text(base.replace("scalebio", "zo") + "bilevel:\n  sources: [{name: a}, {name: b}]\n"
                                        "  validation: {path: t.jsonl}\n")
    with pytest.raises(RecipeError, match="the `bilevel` section is for method scalebio, not 'zo'"):
        load_recipe("tiny.yaml")


def test_bad_bilevel_inputs_at_run_time(tmp_path):
    with pytest.raises(UserError, match="bilevel.copies: adapters needs model.peft"):
        run(scenario(tmp_path, "fo", **{"bilevel.copies": "adapters"}))
    late = scenario(tmp_path, "fo")
    late["bilevel"]["sources"][5] = {"name": "late", "skip": 400}
    with pytest.raises(UserError, match=r"bilevel.sources\[5\].skip: 400 skips every one of the 384 rows"):
        run(late)
    with pytest.raises(UserError, match="bilevel.lisa.layers: 3 is more than the model's 2 blocks"):
        run(scenario(tmp_path, "fo", **{"bilevel.lisa": {"layers": 3}}))
