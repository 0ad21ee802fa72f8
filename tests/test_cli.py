"""The `zotune` command: exit codes, messages without tracebacks, no weights before validation."""

import os
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from zotune import recipe as recipe_mod
from zotune.cli import app
from zotune.errors import UserError
from zotune.recipe import shipped_recipes
from zotune.schema import Recipe

from helpers import TINY, line_of

# Runs the CLI, then reports on stderr how far it got: LIGHT (neither torch nor transformers imported),
# NO MODEL (they were, but not the tiny recipe's llama model code) or MODEL.
PROBE = (
    "import atexit, sys\n"
    "def reach():\n"
    "    if 'transformers.models.llama.modeling_llama' in sys.modules: return 'MODEL'\n"
    "    return 'NO MODEL' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT'\n"
    "atexit.register(lambda: print(reach(), file=sys.stderr))\n"
    "from zotune.cli import main\n"
    "sys.argv[0] = 'zotune'\n"
    "main()\n"
)


def zotune(*args, probe=False, columns=200):
    command = [sys.executable, "-c", PROBE] if probe else [sys.executable, "-m", "zotune.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS=str(columns))
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env, timeout=120)


def test_version():
    from importlib.metadata import version

    import zotune as package

    r = zotune("--version")
    assert r.returncode == 0 and r.stdout == f"zotune {version('zotune')}\n"
    assert package.__version__ == version("zotune")


def test_validate_ok_without_loading_the_model(tiny):
    tiny.write_text(TINY.replace('" terrible", "1": " great"', '"n", "1": "y"'))  # one token each: bytes
    r = zotune("validate", "tiny.yaml", "train.max_steps=7", probe=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok: tiny.yaml (zo, random llama, classification, 7 steps)"
    assert r.stderr.splitlines()[-1] == "NO MODEL"  # preflight reads the config, the data and the tokenizer


def test_validate_bad_recipe(tiny):
    text = TINY.replace("schedule: sequential", "schedule: twice").replace("  max_steps: 5", "  max_step: 5")
    tiny.write_text(text)
    r = zotune("validate", "tiny.yaml")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: tiny.yaml:{line_of(text, 'schedule')}: zo.schedule: 'twice' is not one of: dual, sequential, fused",
        f"error: tiny.yaml:{line_of(text, 'max_step:')}: train.max_step: unknown key; did you mean 'max_steps'?",
    ]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("columns", [200, 80])
def test_ls_lists_shipped_recipes(columns):
    r = zotune("ls", columns=columns)
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= columns
    words = r.stdout.split()
    for name, file in shipped_recipes().items():
        first, second = (line.lstrip("# ").strip() for line in file.read_text().splitlines()[:2])
        assert name in words and first in r.stdout
        assert " ".join(second.split()) in " ".join(words)  # whole, however it wraps


def test_unknown_recipe_name():
    r = zotune("validate", "no-such-recipe")
    assert r.returncode == 2
    assert r.stderr.startswith("error: no recipe 'no-such-recipe': it is not a file and not a shipped recipe")
    assert "Traceback" not in r.stderr


def test_unknown_recipe_name_suggests_a_shipped_one(tiny, monkeypatch):
    monkeypatch.setattr(recipe_mod, "shipped_recipes", lambda: {"quickstart": tiny})
    r = CliRunner().invoke(app, ["train", "quikstart"])
    assert r.exit_code == 2
    assert "did you mean 'quickstart'?" in r.stderr


def test_train_with_bad_override_exits_before_loading_a_model(tiny):
    r = zotune("train", "tiny.yaml", "train.max_steps=abc", probe=True)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: <override train.max_steps=abc>: train.max_steps: expected an integer, got 'abc'",
        "LIGHT",
    ]


@pytest.fixture
def fake_run(monkeypatch):
    """Stands in for zotune.run, recording calls; `raises` makes train raise."""
    calls, module = [], types.ModuleType("zotune.run")

    def train(recipe, source, *, overwrite):
        calls.append((recipe, source, overwrite))
        if module.raises:
            raise module.raises

    module.train, module.raises, module.calls = train, None, calls
    monkeypatch.setitem(sys.modules, "zotune.run", module)
    return module


def test_train_passes_the_validated_recipe_and_source(tiny, fake_run):
    r = CliRunner().invoke(app, ["train", "tiny.yaml", "train.max_steps=9", "zo.eps=1e-4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", "tiny.yaml", "--overwrite"])
    assert r.exit_code == 0, r.output
    [(recipe, source, overwrite), (_, _, overwritten)] = fake_run.calls
    assert isinstance(recipe, Recipe) and recipe.train.max_steps == 9 and recipe.zo.eps == 1e-4
    assert source == "tiny.yaml" and not overwrite and overwritten


@pytest.mark.parametrize("error, code", [(UserError("data.jsonl:3: no 'text' column"), 2), (KeyboardInterrupt(), 130)])
def test_train_errors_exit_codes(tiny, fake_run, error, code):
    fake_run.raises = error
    r = CliRunner().invoke(app, ["train", "tiny.yaml"])
    assert r.exit_code == code
    if code == 2:
        assert r.stderr == "error: data.jsonl:3: no 'text' column\n"


def test_replay_calls_replay(monkeypatch):
    calls = []
    module = types.ModuleType("zotune.replay")
    module.replay = lambda base, trajectory, out_dir, force: calls.append((base, trajectory, out_dir, force))
    monkeypatch.setitem(sys.modules, "zotune.replay", module)
    r = CliRunner().invoke(app, ["replay", "gpt2", "runs/x/trajectory.jsonl", "out"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["replay", "gpt2", "runs/x/trajectory.jsonl", "out", "--force"])
    assert r.exit_code == 0, r.output
    args = ("gpt2", "runs/x/trajectory.jsonl", "out")
    assert calls == [(*args, False), (*args, True)]
