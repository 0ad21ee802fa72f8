"""What `zotune validate` and `zotune train` check after the recipe loads and before any weights do.

Loading a recipe checks its form (`zotune.recipe`). The preflight checks what the form cannot show,
cheapest first:

1. the training arguments: `TrainingArguments` (or `ZOConfig`) built from the recipe, then what the
   Trainer checks without a model: the trackers of `train.report_to` are installed, the optimizer
   (method fo) and the learning-rate scheduler can be made;
2. the data against the task, without a tokenizer: the files' columns and label values
   (`zotune.data.tasks.check_rows`, the rules `zotune train` applies again when it builds the data);
3. with the tokenizer alone (seconds, no weights): the label words (`zotune.data.tasks.label_word_ids`).

Every problem becomes an error line `FILE:LINE: key: what`, like the recipe's own. What cannot be
checked before the weights load is returned as a note rather than passed over in silence.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase,
                          Trainer, TrainingArguments)
from transformers.integrations import get_reporting_integration_callbacks
from transformers.optimization import get_scheduler

from zotune.data.files import load_task_rows
from zotune.data.tasks import check_rows, label_word_ids
from zotune.errors import UserError
from zotune.models import _head, byte_tokenizer, gguf_cache_dir
from zotune.paths import expand_path
from zotune.recipe import RecipeError, locate
from zotune.schema import Recipe, TrainSection
from zotune.settings import ZOSettings, to_config
from zotune.trainer import ZOConfig

RUN_ONLY = {"evaluate_before", "resume_from_checkpoint"}  # TrainSection keys that are not TrainingArguments
# errors with which TrainingArguments, ZOConfig and the Trainer's set-up refuse a value
SETUP_ERRORS = (ValueError, TypeError, ImportError, RuntimeError)
# the recipe keys that reach the training arguments, in the schema's order
SETUP_KEYS = [f"{name}.{key}" for name, section in (("train", TrainSection), ("zo", ZOSettings))
              for key in section.model_fields if key not in RUN_ONLY]


def launched_ranks() -> int:
    """The processes torchrun or accelerate launch started for this run (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_ranks() -> bool:
    """Whether this is one of several torch.distributed ranks on CPUs (gloo): accelerate must be told
    it runs on the CPU, or it takes each rank for a lone process."""
    return launched_ranks() > 1 and not torch.cuda.is_available()


def training_arguments(recipe: Recipe, task=None) -> TrainingArguments:
    """The recipe's `TrainingArguments` (`ZOConfig` for method zo).

    `task` (a `zotune.data.tasks.TaskData`) says whether batches must be read in order (balanced ones);
    before the data is built, checks pass None and get random sampling."""
    fields = recipe.train.model_dump(exclude=RUN_ONLY)
    fields.update(
        remove_unused_columns=False,  # the collators pick their columns themselves
        dataloader_pin_memory=torch.cuda.is_available(),
        train_sampling_strategy="sequential" if task is not None and task.sequential_sampling else "random",
        use_cpu=cpu_ranks(),
    )
    if recipe.method == "fo":
        return TrainingArguments(**fields)
    return ZOConfig(**fields, **to_config(recipe.zo), zo_include=recipe.params.include,
                    zo_exclude=recipe.params.exclude)


class Checked(NamedTuple):
    """What `preflight` found the recipe to leave: notes on what is checked only when the weights load, and
    the tokenizer it loaded (None where it loaded none). The model's loading takes that tokenizer over
    (`load_model(tokenizer=...)`): a large vocabulary's takes seconds to load (Gemma 3's, ~5 s here)."""

    notes: list[str]
    tokenizer: PreTrainedTokenizerBase | None = None


def preflight(recipe: Recipe, *, run_user_code: bool) -> Checked:
    """Check `recipe` before any weights load: raise `RecipeError` listing every problem found, else
    return what is left (`Checked`).

    `run_user_code`: import the `zo.objective` module and load a tokenizer that needs
    `model.trust_remote_code`. `zotune validate` runs no code of the recipe's; `zotune train` does."""
    if recipe.method == "scalebio":
        return Checked(["method scalebio: the training arguments and the data sources are checked when training "
                        "starts"])
    checked = recipe if run_user_code else recipe.model_copy(update={"zo": recipe.zo.model_copy(
        update={"objective": "loss"})})  # ZOConfig imports the objective's module
    problems = [locate(recipe, p) for p in _setup_problems(checked)]
    if recipe.reward is not None and run_user_code:
        from zotune.reward.functions import RewardFunctions

        try:  # imports each function: a wrong path is found before the model loads
            RewardFunctions(recipe.reward.functions, recipe.reward.weights)
        except UserError as e:
            problems.append(locate(recipe, str(e)))
    notes: list[str] = []
    tokenizer = None
    try:
        encoder, tokenizer, note = _model_view(recipe, run_user_code)
        notes += [note] if note else []
        _check_data(recipe, encoder, tokenizer)
    except UserError as e:
        problems += [locate(recipe, p) for p in getattr(e, "problems", None) or [str(e)]]
    if problems:
        raise RecipeError(problems)
    return Checked(notes, tokenizer)


# ---------------------------------------------------------------- training arguments


def _setup_problems(recipe: Recipe) -> list[str]:
    """`key: message` for each value the training arguments or the Trainer's set-up refuse, in the
    order of the schema's keys.

    A refusal names no key, so each one is pinned on the first key whose default makes it go away
    (or change); that key is then reset and the set-up tried again, to find the next."""
    found: dict[str, str] = {}
    error = _setup_error(recipe)
    while error is not None and not isinstance(error, UserError):  # our own errors name their key
        for key, trial in _with_one_default(recipe):
            trial_error = _setup_error(trial)
            if str(trial_error) != str(error):
                break
        else:
            raise error  # no value of the recipe causes it: a bug, with its traceback
        found[key] = str(error)
        recipe, error = trial, trial_error
    return [f"{key}: {found[key]}" for key in SETUP_KEYS if key in found] + ([str(error)] if error else [])


def _with_one_default(recipe: Recipe):
    """(dotted key, the recipe with that key back at its default) for each train and zo key the recipe changes."""
    for key in SETUP_KEYS:
        name, field = key.split(".")
        section = getattr(recipe, name)
        default = type(section).model_fields[field].get_default(call_default_factory=True)
        if getattr(section, field) != default:
            yield key, recipe.model_copy(update={name: section.model_copy(update={field: default})})


def _setup_error(recipe: Recipe) -> Exception | None:
    """The error the Trainer's set-up would raise for this recipe before touching the model, if any."""
    try:
        args = training_arguments(recipe)
        if args.eval_strategy != "no" and recipe.data.eval is None:
            # the Trainer's own check, made where it is handed the (still unbuilt) data
            raise ValueError(f"evaluating during training ({args.eval_strategy.value}) needs data.eval; "
                             "give data.eval or set train.eval_strategy: no")
        for callback in get_reporting_integration_callbacks(args.report_to):
            callback()  # a tracker's callback refuses to start when its package is missing
        if recipe.method == "fo":
            # a stand-in model: LOMO only needs one to exist; GaLore and Apollo need keys zotune has not
            Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Module())
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                      num_training_steps=args.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (UserError, *SETUP_ERRORS) as e:
        return e
    return None


# ---------------------------------------------------------------- data


def _model_view(recipe: Recipe, run_user_code: bool):
    """(whether the model is a sequence classifier, its tokenizer, a note), read without the weights.

    Where one cannot be read yet it is None, and the note says what is left for the model's loading."""
    section = recipe.model
    verbalizer = recipe.data.verbalizer
    num_labels = len(verbalizer) if verbalizer else None
    if section.config is not None:
        fields = dict(section.config)
        try:
            config = AutoConfig.for_model(fields.pop("model_type", None), **fields)
        except Exception:  # noqa: BLE001 -- building the model reports a bad config, with its own message
            return None, None, "model.config: the data's fit to the model is checked when the model is built"
        return _head(config, num_labels) is AutoModelForSequenceClassification, byte_tokenizer(), None
    if section.gguf_file is not None or section.gguf_package is not None:
        # a GGUF model is a causal LM; its tokenizer exists once the GGUF has been converted
        checks_words = recipe.data.task == "classification"  # the only check that needs the tokenizer
        if section.gguf_package is not None and not run_user_code:
            return False, None, ("model.gguf_package: the tokenizer's checks (data.verbalizer) run when training "
                                 "starts" if checks_words else None)
        path = gguf_cache_dir(section)
        if not path.is_dir():
            return False, None, ("model: the GGUF model is converted when it first loads; the tokenizer's checks "
                                 "(data.verbalizer) run then" if checks_words else None)
        return False, AutoTokenizer.from_pretrained(path), None
    path, trust = str(expand_path(section.name_or_path)), section.trust_remote_code
    if trust and not run_user_code:
        return None, None, ("model.trust_remote_code: reading the model's config runs its code, so the data is "
                            "checked when training starts")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load the config and tokenizer of {path!r}: {e}") from e
    return _head(config, num_labels) is AutoModelForSequenceClassification, tokenizer, None


def _check_data(recipe: Recipe, encoder: bool | None, tokenizer) -> None:
    section = recipe.data
    rows = load_task_rows(section)
    if encoder is None:
        return
    check_rows(section, *rows, encoder=encoder, batch_size=recipe.train.per_device_train_batch_size)
    if tokenizer is not None and section.task == "classification" and not encoder:
        label_word_ids(tokenizer, section.verbalizer)
