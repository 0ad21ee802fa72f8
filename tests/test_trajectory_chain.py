"""A log that proves itself: every trajectory line is chained by sha256 to the one it follows.

Each tampering (an edited g or lr, a dropped, swapped or foreign record) is refused, naming the
line, both by `zotune replay` (exit 2, one `error:` line) and by a ZOTrainer resuming over the
log; untouched logs, resume markers and torn lines included, replay bit for bit. Also the one
output-folder rule that replay shares with export: never the run directory, --force for a
non-empty one.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_causal_lm
from safetensors.torch import load_file
from helpers import DATA, make_trainer, write_recipe
from typer.testing import CliRunner

from zotune.cli import app
from zotune.errors import UserError
from zotune.recipe import load_recipe
from zotune.run import train
from zotune.trajectory import CHAIN, FILENAME, FORMAT, RESUME, TrajectoryWriter, read_trajectory

HEADER = {"params": ["w"], "no_decay": [], "init_sha256": "ab" * 32, "optimizer": {"rule": "sgd"}}
SAVE_EVERY_2 = dict(max_steps=4, save_strategy="steps", save_steps=2)


def expected_link(row: dict, previous: str) -> str:
    """The chain rule written out again, independently of zotune.trajectory."""
    body = {k: v for k, v in row.items() if k != "chain"}
    return hashlib.sha256((previous + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """`zotune train` of a tiny llama for 4 steps, resumed once from checkpoint-2: its log has a resume marker."""
    if not DATA.is_dir():
        pytest.skip("needs ../shared/data")
    root = tmp_path_factory.mktemp("recipe_run")
    path = write_recipe(root, train={"save_strategy": "steps", "save_steps": 2})
    train(load_recipe(str(path)), str(path))
    train(load_recipe(str(path), [f"train.resume_from_checkpoint={root / 'run' / 'checkpoint-2'}"]), str(path))
    return root / "run"


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Path:
    """A ZOTrainer run of a tiny llama for 4 steps, with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trainer_run")
    make_trainer(tiny_causal_lm("llama"), out, **SAVE_EVERY_2).train()
    return out


# -- the rule, against a reference written out here ------------------------------------------


def test_each_line_follows_the_checksum_before_it_and_a_marker_the_record_it_keeps(recipe_run):
    rows = [json.loads(line) for line in (recipe_run / FILENAME).read_text().splitlines()]
    assert rows[0]["format"] == FORMAT and [r.get("step", r.get(RESUME)) for r in rows[1:]] == [0, 1, 2, 3, 2, 2, 3]
    previous = rows[0]["init_sha256"]  # the header follows the initial weights' hash
    for row in rows:
        if RESUME in row:  # resumed at step S: it follows the record of step S-1
            previous = next(r for r in rows if r.get("step") == row[RESUME] - 1)[CHAIN]
        assert row[CHAIN] == expected_link(row, previous), row
        previous = row[CHAIN]


def test_records_come_back_without_their_checksums(recipe_run):
    header, records = read_trajectory(recipe_run)
    assert CHAIN not in header and all(CHAIN not in r for r in records)
    assert [r["step"] for r in records] == [0, 1, 2, 3]


# -- tampering: named by line on replay and on resume ----------------------------------------

# each takes the log's lines (0: header, 1-4: steps 0-3) and another run's; returns the new lines
# and the 1-based line that must be named


def edit_g(lines, other):
    row = json.loads(lines[2])
    row["g"] = [g + 1e-3 for g in row["g"]]
    return lines[:2] + [json.dumps(row)] + lines[3:], 3


def edit_lr(lines, other):
    row = json.loads(lines[1])
    row["lr"] *= 2
    return lines[:1] + [json.dumps(row)] + lines[2:], 2


def drop_a_middle_record(lines, other):
    return lines[:2] + lines[3:], 3


def swap_two_records(lines, other):
    return lines[:2] + [lines[3], lines[2]] + lines[4:], 3


def insert_another_runs_record(lines, other):
    return lines[:2] + [other[2]] + lines[2:], 3  # the other run's step 1, in its place: only the chain tells


TAMPERINGS = [edit_g, edit_lr, drop_a_middle_record, swap_two_records, insert_another_runs_record]


def tampered_copy(run: Path, other: Path, tamper, dest: Path) -> tuple[Path, int]:
    shutil.copytree(run, dest)
    log = dest / FILENAME
    lines, line = tamper(log.read_text().splitlines(), (other / FILENAME).read_text().splitlines())
    log.write_text("\n".join(lines) + "\n")
    return log, line


def replay_cli(*args) -> tuple[int, str]:
    done = CliRunner().invoke(app, ["replay", *map(str, args)])
    return done.exit_code, " ".join(done.output.split())  # rich may wrap long lines


def assert_refused(code: int, output: str, where: str) -> None:
    assert code == 2, output
    assert output.startswith(f"error: {where}: ") and "Traceback" not in output
    assert "checksum chain" in output and "the records before line" in output


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_replay_of_a_tampered_log_names_the_line(recipe_run, trainer_run, tamper, tmp_path):
    log, line = tampered_copy(recipe_run, trainer_run, tamper, tmp_path / "run")
    code, output = replay_cli(tmp_path / "run", log, tmp_path / "out")
    assert_refused(code, output, f"{log}:{line}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_a_resume_over_a_tampered_log_refuses_and_leaves_it_as_it_was(trainer_run, recipe_run, tamper, tmp_path):
    log, line = tampered_copy(trainer_run, recipe_run, tamper, tmp_path / "run")
    before = log.read_bytes()
    trainer = make_trainer(tiny_causal_lm("llama"), tmp_path / "run", **SAVE_EVERY_2)
    with pytest.raises(UserError, match=rf"{FILENAME}:{line}: record of step \d+ does not match the log's checksum"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert log.read_bytes() == before


def test_a_foreign_record_before_a_resume_marker_is_no_torn_line(recipe_run, trainer_run, tmp_path):
    def before_the_marker(lines, other):
        at = next(i for i, line in enumerate(lines) if RESUME in json.loads(line))
        return lines[:at] + [other[4]] + lines[at:], at + 1

    log, line = tampered_copy(recipe_run, trainer_run, before_the_marker, tmp_path / "run")
    assert_refused(*replay_cli(tmp_path / "run", log, tmp_path / "out"), f"{log}:{line}")


def test_an_edited_header_or_marker_is_named(recipe_run, tmp_path):
    shutil.copytree(recipe_run, tmp_path / "run")
    log = tmp_path / "run" / FILENAME
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    # a log passed off as another run's start: the header follows the initial weights' hash
    header["init_sha256"] = "0" * 64
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r":1: the header does not match its checksum"):
        read_trajectory(log)

    at = next(i for i, line in enumerate(lines) if RESUME in json.loads(line))
    marker = json.loads(lines[at])
    marker[RESUME] = 1  # resumed earlier than the run did: step 1's record would be dropped
    log.write_text("\n".join([*lines[:at], json.dumps(marker), *lines[at + 1:]]) + "\n")
    with pytest.raises(UserError, match=rf":{at + 1}: the resume marker at step 1 does not match"):
        read_trajectory(log)


# -- what is still tolerated -------------------------------------------------------------------


def test_a_log_with_a_resume_marker_and_a_torn_line_replays_bit_identical(recipe_run, tmp_path):
    shutil.copytree(recipe_run, tmp_path / "run")
    log = tmp_path / "run" / FILENAME
    with log.open("a") as f:
        f.write('{"step": 4, "g": [0.5')  # a crash mid-line
    code, output = replay_cli(tmp_path / "run", log, tmp_path / "out")
    assert code == 0, output
    trained, replayed = load_file(recipe_run / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert trained.keys() == replayed.keys()
    for name in trained:
        assert trained[name].equal(replayed[name]), name


def test_a_resume_over_a_torn_line_chains_on_and_reads_back(tmp_path):
    w = TrajectoryWriter(tmp_path)
    w.start(0, HEADER)
    for s in range(3):
        w.append({"step": s, "g": [float(s)]})
    w.close()
    with (tmp_path / FILENAME).open("a") as f:
        f.write('{"step": 3, "g": [0.1')
    w.start(2, HEADER)
    w.append({"step": 2, "g": [7.0]})
    w.close()
    assert [(r["step"], r["g"]) for r in read_trajectory(tmp_path)[1]] == [(0, [0.0]), (1, [1.0]), (2, [7.0])]


def test_a_resume_onto_a_log_that_ends_too_early_refuses(tmp_path):
    w = TrajectoryWriter(tmp_path)
    w.start(0, HEADER)
    w.append({"step": 0, "g": [0.0]})
    w.close()
    with pytest.raises(UserError, match=r"resumed at step 3, but the log ends before step 1"):
        w.start(3, HEADER)


def test_a_resumed_version_2_log_is_continued_unchained(tmp_path):
    path = tmp_path / FILENAME
    rows = [{"format": "zotune-trajectory/2", "start_step": 0, **HEADER}, {"step": 0, "g": [1.0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = TrajectoryWriter(tmp_path)
    w.start(1, HEADER)
    w.append({"step": 1, "g": [2.0]})
    w.close()
    assert all(CHAIN not in json.loads(line) for line in path.read_text().splitlines())
    assert [r["g"] for r in read_trajectory(path)[1]] == [[1.0], [2.0]]


# -- where replay may write: the rule it shares with export ----------------------------------


def test_replay_never_writes_into_the_run_directory(recipe_run, tmp_path):
    shutil.copytree(recipe_run, tmp_path / "run")
    run, log = tmp_path / "run", tmp_path / "run" / FILENAME
    weights = (run / "model.safetensors").read_bytes()
    for force in ([], ["--force"]):
        code, output = replay_cli(run, log, run, *force)
        assert code == 2 and output.startswith(f"error: {run}: is the run directory itself"), output
    other_base = tmp_path / "base"
    shutil.copytree(run, other_base)
    code, output = replay_cli(other_base, log, other_base, "--force")
    assert code == 2 and output.startswith(f"error: {other_base}: is BASE itself"), output
    assert (run / "model.safetensors").read_bytes() == weights


def test_replay_into_a_non_empty_folder_needs_force(recipe_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (busy / "adapter_config.json").write_text("{}")  # stale weights of the other kind: --force removes them
    code, output = replay_cli(recipe_run, recipe_run / FILENAME, busy)
    assert code == 2 and output.startswith(f"error: {busy}: exists and is not empty; pass --force"), output
    assert sorted(p.name for p in busy.iterdir()) == ["adapter_config.json", "notes.txt"]

    code, output = replay_cli(recipe_run, recipe_run / FILENAME, busy, "--force")
    assert code == 0, output
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / "adapter_config.json").exists()
    trained, replayed = load_file(recipe_run / "model.safetensors"), load_file(busy / "model.safetensors")
    assert all(trained[name].equal(replayed[name]) for name in trained)
