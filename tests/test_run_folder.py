"""A run owns its output folder (zotune.rundir), and a finished run is never lost to a Ctrl-C.

Each test reproduces a way a run used to lose or mix data, through `zotune train` as a user runs
it, and compares the weights with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import assert_same_weights
from helpers import write_momentum_recipe as write_recipe
from zotune.cli import app
from zotune.recipe import load_recipe
from zotune.rundir import IDENTITY
from zotune.run import train
from zotune.trainer import ZOTrainer

STEPS = dict(max_steps=4, save_steps=2)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints 2 and 4 and the final model."""
    root = tmp_path_factory.mktemp("finished")
    path = write_recipe(root, "run", **STEPS)
    train(load_recipe(str(path)), str(path))
    return root / "run"


def test_a_new_run_into_another_runs_folder_is_refused_until_overwrite(tmp_path):
    a = write_recipe(tmp_path, "run", **STEPS)
    assert cli("train", str(a)).exit_code == 0
    before = files(tmp_path / "run")
    b = write_recipe(tmp_path, "b", output_dir=str(tmp_path / "run"), seed=7, learning_rate=5e-3, **STEPS)

    result = cli("train", str(b))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "holds another run started" in result.output and "checkpoints 2-4" in result.output
    assert f"zotune train {tmp_path / 'run' / 'recipe.yaml'} train.resume_from_checkpoint=latest" in result.output
    assert "--overwrite" in result.output
    assert files(tmp_path / "run") == before  # nothing of run A was touched

    assert cli("train", str(b), "--overwrite").exit_code == 0
    recipe = load_recipe(str(tmp_path / "run" / "recipe.yaml"))
    assert recipe.train.seed == 7 and recipe.train.learning_rate == 5e-3
    identity = json.loads((tmp_path / "run" / IDENTITY).read_text())
    assert identity["seed"] == 7
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # B's checkpoints, stamped with B's identity
        assert json.loads((tmp_path / "run" / checkpoint / IDENTITY).read_text())["id"] == identity["id"]


def test_overwrite_never_deletes_files_that_are_not_a_runs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    path = write_recipe(tmp_path, "r", output_dir=str(tmp_path / "run"), **STEPS)
    for extra in ([], ["--overwrite"]):
        result = cli("train", str(path), *extra)
        assert result.exit_code == 2 and "not a zotune run (notes.txt" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    path = write_recipe(tmp_path, "run", **STEPS)
    # the holder is another process, as a second `zotune train` would see a first one
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from zotune.rundir import claim;"
        f"held = claim(Path({str(tmp_path / 'run')!r}), 'x', seed=0, resuming=False, overwrite=False);"
        "print('held', flush=True); sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for extra in ([], ["train.resume_from_checkpoint=latest"]):
            result = cli("train", str(path), *extra)
            assert result.exit_code == 2, result.output
            assert f"another zotune run (pid {holder.pid}) is writing to this folder" in result.output
    finally:
        holder.communicate("")
    assert cli("train", str(path), "--overwrite").exit_code == 0  # the lock went with its process


def test_latest_resumes_only_this_runs_checkpoints(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoint-4")
    (run / "model.safetensors").unlink()
    foreign = run / "checkpoint-4"  # another run's newer checkpoint, with other weights
    shutil.copytree(finished / "checkpoint-4", foreign)
    save_file({k: v + 1 for k, v in load_file(foreign / "model.safetensors").items()}, foreign / "model.safetensors")
    (foreign / IDENTITY).write_text(json.dumps({"id": "another run"}))

    result = cli("train", str(run / "recipe.yaml"), f"train.output_dir={run}", "train.resume_from_checkpoint=latest")
    assert result.exit_code == 0, result.output
    assert_same_weights(load_file(run / "model.safetensors"), load_file(finished / "model.safetensors"))
    assert json.loads((foreign / IDENTITY).read_text()) == json.loads((run / IDENTITY).read_text())  # resaved


def test_a_damaged_checkpoint_is_named_with_the_last_intact_one(tmp_path, finished):
    shutil.copytree(finished, tmp_path / "run")
    weights = tmp_path / "run" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    here = f"train.output_dir={tmp_path / 'run'}"  # the copied recipe names the original folder
    result = cli("train", str(tmp_path / "run" / "recipe.yaml"), here, "train.resume_from_checkpoint=latest")
    assert result.exit_code == 2 and "Traceback" not in result.output
    good = tmp_path / "run" / "checkpoint-2"
    assert "checkpoint-4 is damaged (model.safetensors:" in result.output
    assert f"train.resume_from_checkpoint={good}" in result.output

    result = cli("train", str(tmp_path / "run" / "recipe.yaml"), here, f"train.resume_from_checkpoint={good}")
    assert result.exit_code == 0, result.output
    assert_same_weights(load_file(tmp_path / "run" / "model.safetensors"), load_file(finished / "model.safetensors"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the 2 steps this run took, not all 4 (train_seconds is rounded to 0.1 s)
    assert summary["seconds_per_step"] * 2 == pytest.approx(summary["train_seconds"], abs=0.051)


def test_ctrl_c_in_the_final_evaluation_keeps_the_trained_model(tmp_path, finished, monkeypatch):
    path = write_recipe(tmp_path, "run", **STEPS, save_strategy="no")  # nothing but the final model is saved
    recipe = load_recipe(str(path), [f"data.eval.path={path.parent / 'train.jsonl'}", "data.eval.max_samples=8"])
    evaluate = ZOTrainer.evaluate

    def interrupted_after_training(self, *args, **kwargs):
        if self.state.global_step == STEPS["max_steps"]:
            raise KeyboardInterrupt
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(ZOTrainer, "evaluate", interrupted_after_training)
    with pytest.raises(SystemExit) as stopped:
        train(recipe, str(path))
    assert stopped.value.code == 130
    assert_same_weights(load_file(tmp_path / "run" / "model.safetensors"), load_file(finished / "model.safetensors"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_accuracy_after"] is None


def test_ctrl_c_while_saving_waits_for_whole_files(tmp_path, finished, monkeypatch):
    path = write_recipe(tmp_path, "run", **STEPS, save_strategy="no")
    save_model = ZOTrainer.save_model

    def interrupted_midway(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as the final save begins
        return save_model(self, *args, **kwargs)

    monkeypatch.setattr(ZOTrainer, "save_model", interrupted_midway)
    with pytest.raises(SystemExit) as stopped:
        train(load_recipe(str(path)), str(path))
    assert stopped.value.code == 130
    run = tmp_path / "run"
    assert_same_weights(load_file(run / "model.safetensors"), load_file(finished / "model.safetensors"))
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS["max_steps"]



@pytest.mark.parametrize("command", ["export", "replay"])
def test_ctrl_c_while_exporting_or_replaying_waits_for_whole_files(tmp_path, finished, monkeypatch, command):
    from transformers import PreTrainedModel

    from zotune.export import export
    from zotune.replay import replay

    save_pretrained = PreTrainedModel.save_pretrained

    def interrupted_midway(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save_pretrained(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted_midway)
    with pytest.raises(SystemExit) as stopped:
        if command == "export":
            export(str(finished), str(tmp_path / "out"))
        else:
            replay(str(finished), str(finished / "zo_trajectory.jsonl"), str(tmp_path / "out"))
    assert stopped.value.code == 130
    assert_same_weights(load_file(tmp_path / "out" / "model.safetensors"), load_file(finished / "model.safetensors"))


def test_an_unwritable_output_folder_is_an_error_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = write_recipe(tmp_path, "r", output_dir=str(tmp_path / "a-file" / "run"), **STEPS)
    result = cli("train", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{tmp_path / 'a-file' / 'run'}: cannot write to train.output_dir: Not a directory" in result.output
