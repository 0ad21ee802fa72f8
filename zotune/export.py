"""`zotune export`: the weights of a finished run (or one of its checkpoints), ready to share.

Without `merge` the weights are written as they trained: the peft adapter
(adapter_model.safetensors + adapter_config.json) when the run trained one, else the full
model in safetensors. With `merge` the adapter is folded into the base weights, giving a plain
transformers model that `from_pretrained` loads without peft. The tokenizer goes along in
both cases, and a model card (README.md, `zotune.model_card`) with the recipe, the data, the
run's before/after metrics and the trajectory's hash.

A run whose base was quantized (`model.quantization`) trained its adapter on the dequantized
weights (zotune keeps bitsandbytes on its dequantizing path), so `merge` dequantizes the base
first and folds the adapter into that: the merged model, in the recipe's dtype, computes what
the trained quantized model computed. The adapter alone still needs the quantized base.

The base model is rebuilt from the run's recipe.yaml, as `zotune replay` does, so the recipe's
model source (and its data files, which loading a recipe checks) must still be there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from zotune.errors import UserError
from zotune.model_card import write_model_card
from zotune.outdir import ADAPTER_CONFIG, FULL_WEIGHTS, prepare_out_dir

console = Console(stderr=True, highlight=False)

RECIPE = "recipe.yaml"


@dataclass(frozen=True)
class RunWeights:
    """Where a run's trained weights and its recipe are."""

    weights: Path  # the run directory or a checkpoint-N inside it
    recipe: Path  # the run's recipe.yaml
    adapter: bool  # a peft adapter, else the full model


def find_run(run_dir: str) -> RunWeights:
    """The weights and recipe of RUN_DIR: a `zotune train` output directory or a checkpoint in one."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"{run_dir}: no such directory")
    recipe = path / RECIPE
    if not recipe.is_file() and path.name.startswith("checkpoint-"):
        recipe = path.parent / RECIPE
    if not recipe.is_file():
        raise UserError(
            f"{run_dir}: no {RECIPE} here (nor in the parent of a checkpoint-N); "
            "give the output directory of `zotune train`"
        )
    if (path / ADAPTER_CONFIG).is_file():
        return RunWeights(path, recipe, adapter=True)
    if any((path / name).is_file() for name in FULL_WEIGHTS):
        return RunWeights(path, recipe, adapter=False)
    raise UserError(f"{run_dir}: no saved weights ({ADAPTER_CONFIG} or model.safetensors); did the run finish?")


def export(run_dir: str, out_dir: str, *, merge: bool = False, force: bool = False) -> str:
    """Write the run's weights to OUT_DIR; returns what was written ("adapter", "merged model", "full model")."""
    run = find_run(run_dir)
    if merge and not run.adapter:
        raise UserError(
            f"{run_dir}: the run trained the full model, there is no adapter, so nothing to merge; "
            "export it without --merge"
        )
    run_itself = "the run directory itself"
    out = prepare_out_dir(out_dir, {run.weights: run_itself, run.recipe.parent: run_itself}, force)
    with console.status(f"loading {run.weights}"):
        if not run.adapter:
            model, tokenizer = _full_model(run)
            kind = "full model"
        else:
            model, tokenizer = _adapter_model(run, dequantize=merge)
            kind = "adapter"
            if merge:
                model, kind = _merged(model, run_dir), "merged model"
    from zotune.checkpoints import exit_interrupted, finish_writing

    with console.status(f"writing the {kind} to {out}"), finish_writing(f"the {kind} to {out}") as deferred:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))  # transformers 5 and peft write safetensors
        tokenizer.save_pretrained(str(out))
        write_model_card(out, run.recipe.parent, run.recipe, run.weights, kind)
    if deferred.requested:
        exit_interrupted(f"interrupted: the {kind} in {out} was written whole first")
    return kind


def _adapter_model(run: RunWeights, dequantize: bool):
    """The run's base model (rebuilt from its recipe, without its fresh adapter) with the trained adapter loaded."""
    from peft import PeftModel

    from zotune.models import load_model
    from zotune.recipe import load_recipe

    recipe = load_recipe(str(run.recipe))
    verbalizer = recipe.data.verbalizer
    model, tokenizer = load_model(
        recipe.model.model_copy(update={"peft": None}),
        num_labels=len(verbalizer) if verbalizer else None,
        seed=recipe.train.seed,
    )
    if dequantize and recipe.model.quantization is not None:
        model = model.dequantize()
    return PeftModel.from_pretrained(model, str(run.weights)), tokenizer


def _full_model(run: RunWeights):
    """The fully trained model saved in the run, in the recipe's dtype."""
    from zotune.models import load_model
    from zotune.recipe import load_recipe
    from zotune.schema import ModelSection

    section = load_recipe(str(run.recipe)).model
    saved = ModelSection(
        name_or_path=str(run.weights.resolve()), dtype=section.dtype, trust_remote_code=section.trust_remote_code
    )
    return load_model(saved)


def _merged(peft_model, run_dir: str):
    """The base model with the adapter folded into its weights (LoRA and the other additive tuners)."""
    config = peft_model.peft_config["default"]
    if config.is_prompt_learning:
        raise UserError(
            f"{run_dir}: a {config.peft_type.value} adapter adds tokens, not weights, so it cannot be merged; "
            "export it without --merge"
        )
    return peft_model.merge_and_unload()
