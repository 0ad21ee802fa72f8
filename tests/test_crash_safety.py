"""Crash safety: an append-only trajectory, atomic checkpoints, SIGKILL and Ctrl-C mid-run.

The end-to-end tests run `zotune train` in subprocesses on a tiny random llama, kill
them at seeded random points, resume, and check the weights bit for bit against an
uninterrupted run (trained in this process, with a checkpoint at every step).
"""

import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from helpers import MOMENTUM_RUN_STEPS as MAX_STEPS
from helpers import assert_same_weights
from helpers import write_momentum_recipe as write_recipe

from zotune.checkpoints import STAGING, TRASH, clean_stale, publish
from zotune.errors import UserError
from zotune.models import trainable_parameters
from zotune.recipe import load_recipe
from zotune.replay import optimizer_from_header, replay
from zotune.run import build_model, train
from zotune.trajectory import CHAIN, FILENAME, FORMAT, TrajectoryWriter, read_trajectory

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
HEADER = {"params": ["w"], "no_decay": [], "init_sha256": "0" * 64, "optimizer": {"rule": "sgd"}}


# -- the log: append-only, torn lines -------------------------------------------------------


def log_lines(path: Path) -> list[str]:
    return path.read_text().split("\n")


def unchained(line: str) -> dict:
    """A log line's row without its checksum (tests/test_trajectory_chain.py checks those)."""
    return {k: v for k, v in json.loads(line).items() if k != CHAIN}


def test_resume_appends_a_marker_and_later_records_supersede(tmp_path):
    w = TrajectoryWriter(tmp_path)
    w.start(0, HEADER)
    for s in range(5):
        w.append({"step": s, "g": [float(s)]})
    w.close()
    before = (tmp_path / FILENAME).read_text()

    w.start(3, HEADER)  # resumed from checkpoint-3: steps 3 and 4 are redone
    for s in range(3, 6):
        w.append({"step": s, "g": [10.0 + s]})
    w.close()
    text = (tmp_path / FILENAME).read_text()
    assert text.startswith(before)  # nothing written is ever rewritten
    assert unchained(text.splitlines()[6]) == {"resume": 3}
    header, records = read_trajectory(tmp_path)
    assert header["format"] == FORMAT and header["start_step"] == 0
    assert [(r["step"], r["g"][0]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_torn_last_line_is_ignored_with_a_warning(tmp_path, caplog):
    w = TrajectoryWriter(tmp_path)
    w.start(0, HEADER)
    for s in range(3):
        w.append({"step": s, "g": [1.0]})
    w.close()
    path = tmp_path / FILENAME
    with path.open("a") as f:
        f.write('{"step": 3, "g": [0.12')  # the crash hit mid-line
    with caplog.at_level(logging.WARNING, logger="zotune"):
        _, records = read_trajectory(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "torn line 5" in caplog.text

    # a run resumed after the crash ends the fragment first; the fragment stays tolerated before the marker
    w.start(2, HEADER)
    w.append({"step": 2, "g": [2.0]})
    w.close()
    lines = log_lines(path)
    assert lines[4] == '{"step": 3, "g": [0.12'
    assert [unchained(line) for line in lines[5:7]] == [{"resume": 2}, {"step": 2, "g": [2.0]}]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune"):
        _, records = read_trajectory(path)
    assert [(r["step"], r["g"]) for r in records] == [(0, [1.0]), (1, [1.0]), (2, [2.0])]
    assert "torn line 5" in caplog.text


def test_a_malformed_line_elsewhere_is_an_error_naming_it(tmp_path):
    path = tmp_path / FILENAME
    # an unchained /2 log: these checks come before and without the chain's (tests/test_trajectory_chain.py)
    head = json.dumps({"format": "zotune-trajectory/2", "start_step": 0, **HEADER})
    path.write_text(head + '\n{"step": 0, "g": [1.0]}\n{"step": 1, "g\n{"step": 2, "g": [1.0]}\n')
    with pytest.raises(UserError, match=r":3: not a JSON line"):
        read_trajectory(path)
    path.write_text(head + '\n{"step": 0, "g": [1.0]}\n{"step": 2, "g": [1.0]}\n')
    with pytest.raises(UserError, match=r":3: step 2 follows step 0: the log has a gap"):
        read_trajectory(path)
    path.write_text(head + '\n{"step": 0, "g": [1.0]}\n{"resume": 4}\n{"step": 4, "g": [1.0]}\n')
    with pytest.raises(UserError, match=r":3: a run resumed at step 4, but the log ends before step 1"):
        read_trajectory(path)
    path.write_text('{"step": 0, "g": [1.0]}\n')
    with pytest.raises(UserError, match=r":1: not a zotune trajectory"):
        read_trajectory(path)


@pytest.mark.parametrize("version", [1, 2])
def test_unchained_logs_of_versions_1_and_2_still_read(tmp_path, version):
    path = tmp_path / FILENAME
    rows = [{"format": f"zotune-trajectory/{version}", "start_step": 0, **HEADER}]
    rows += [{"step": s, "g": [1.0]} for s in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_trajectory(path)[1]] == [0, 1, 2]


# -- checkpoints: published whole or not at all ----------------------------------------------


def fake_checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_staging_and_replaced_checkpoints_are_never_taken_for_complete_ones(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-2", 2)
    fake_checkpoint(tmp_path / f"{STAGING}4" / "checkpoint-4", 4)  # a crash mid-save of step 4
    fake_checkpoint(tmp_path / f"{TRASH}3", 3)  # a crash between the two renames of a re-saved step 3
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    clean_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]  # the staging dir goes, 3 comes back

    fake_checkpoint(tmp_path / "new", 3)
    publish(str(tmp_path / "new"), str(tmp_path / "checkpoint-3"))  # a resumed run saves step 3 again
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


# -- end to end: SIGKILL and Ctrl-C during `zotune train` ------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference")
    path = write_recipe(root, "run", save_steps=1)
    train(load_recipe(str(path)), str(path))
    return root / "run"


def launch(recipe: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    err = open(recipe.parent / f"stderr-{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "zotune.cli", "train", str(recipe), *overrides],
                            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=recipe.parent)
    proc.stderr_file = err
    return proc


def last_logged_step(log: Path) -> int:
    """The step of the last complete record line of a log being written (-1 if none)."""
    try:
        lines = log.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        return row.get("step", row.get("resume", 0) - 1) if "format" not in row else -1
    return -1


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline, "the training subprocess made no progress"
        time.sleep(0.005)


def wait_for_step(proc: subprocess.Popen, log: Path, step: int) -> None:
    wait_for(proc, lambda: last_logged_step(log) >= step)


def checkpoints(run: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in run.glob("checkpoint-*")}


def replay_tail(recipe: Path, run: Path, checkpoint: int) -> tuple[dict[str, torch.Tensor], int]:
    """The weights that the log's records from `checkpoint` on give when replayed onto that checkpoint."""
    model, _ = build_model(load_recipe(str(recipe)))
    ckpt = run / f"checkpoint-{checkpoint}"
    missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    assert not unexpected
    header, records = read_trajectory(run)
    available = dict(trainable_parameters(model, [], []))
    zo = optimizer_from_header(header, [(n, available[n]) for n in header["params"]])
    zo.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))  # the momentum buffers
    tail = [r for r in records if r["step"] >= checkpoint]
    for record in tail:
        zo.replay(record)
    zo.flush()
    return {k: v for k, v in model.state_dict().items()}, (tail[-1]["step"] + 1 if tail else checkpoint)


def test_sigkill_at_random_points_then_resume_and_replay_match_an_uninterrupted_run(tmp_path, reference):
    rng = random.Random(2024)
    path = write_recipe(tmp_path, "run")
    run, log = tmp_path / "run", tmp_path / "run" / FILENAME
    ref_final = load_file(reference / "model.safetensors")

    for kill in range(3):
        done = max(checkpoints(run), default=0)
        resume = ["train.resume_from_checkpoint=latest"] if done else []
        proc = launch(path, *resume)
        # a random step past both the last checkpoint and what the log holds already
        target = max(done + rng.randint(1, 4), last_logged_step(log) + 1)
        wait_for_step(proc, log, min(target, MAX_STEPS - 6))  # well before the end: killed mid-run
        if kill == 1:  # the next checkpoint's staging dir appears: kill it half-written
            wait_for(proc, lambda: any(run.glob(f"{STAGING}*/checkpoint-*/*")))
        else:
            time.sleep(rng.uniform(0, 0.15))  # anywhere in a step
        proc.kill()
        proc.wait()
        for step, ckpt in checkpoints(run).items():  # whatever was killed, every checkpoint-N is whole
            assert all((ckpt / f).is_file() for f in CHECKPOINT_FILES), ckpt
            assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step

        # the log's tail past the last checkpoint, replayed onto it: the uninterrupted run at that step
        last = max(checkpoints(run), default=None)
        if last is not None:
            replayed, at = replay_tail(path, run, last)
            expected = load_file(reference / f"checkpoint-{at}" / "model.safetensors")
            assert_same_weights(replayed, expected)

    if max(checkpoints(run), default=0) == MAX_STEPS:  # a slow kill: the last victim finished
        final = load_file(run / f"checkpoint-{MAX_STEPS}" / "model.safetensors")
    else:
        resume = ["train.resume_from_checkpoint=latest"] if checkpoints(run) else []
        train(load_recipe(str(path), resume), str(path))
        final = load_file(run / "model.safetensors")
    assert_same_weights(final, ref_final)
    # the whole append-only log, resume markers and torn lines included, replays to the same weights
    header, records = read_trajectory(run)
    assert [r["step"] for r in records] == list(range(MAX_STEPS))
    replay(str(run), str(log), str(tmp_path / "replayed"))
    assert_same_weights(load_file(tmp_path / "replayed" / "model.safetensors"), ref_final)
    assert not [p for p in run.iterdir() if p.name.startswith((STAGING, TRASH))]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, reference):
    path = write_recipe(tmp_path, "run", save_strategy="no")  # the checkpoint comes from Ctrl-C alone
    run = tmp_path / "run"
    proc = launch(path)
    wait_for_step(proc, run / FILENAME, 4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    proc.stderr_file.seek(0)
    stderr = proc.stderr_file.read()
    assert "Traceback" not in stderr
    [step] = checkpoints(run)
    assert 5 <= step < MAX_STEPS
    message = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    command = f"zotune train {run / 'recipe.yaml'} train.resume_from_checkpoint=latest"
    assert message == [f"interrupted at step {step}: saved {run / f'checkpoint-{step}'}; resume with: {command}"]
    assert not (run / "model.safetensors").exists()  # an interrupted run leaves no final model to mistake

    _, _, recipe, override = shlex.split(command)  # the command as printed, with no override retyped
    train(load_recipe(recipe, [override]), recipe)
    assert_same_weights(load_file(run / "model.safetensors"), load_file(reference / "model.safetensors"))


def test_resume_from_the_final_checkpoint_trains_no_more(tmp_path):
    from conftest import tiny_causal_lm
    from helpers import make_trainer

    common = dict(max_steps=6, save_strategy="steps", save_steps=3)  # 32 rows, batches of 8: step 6 is mid-epoch
    make_trainer(tiny_causal_lm("llama"), tmp_path, **common).train()
    trainer = make_trainer(tiny_causal_lm("llama"), tmp_path, **common)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert trainer.state.global_step == 6
