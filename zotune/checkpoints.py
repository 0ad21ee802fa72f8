"""Crash safety of training runs: atomic checkpoints, and a Ctrl-C that saves one.

A checkpoint is written whole into a hidden sibling `.tmp-checkpoint-N/checkpoint-N`,
fsynced, then renamed into place as `checkpoint-N`: a crash mid-save leaves only the
hidden staging directory, which no resume (`get_last_checkpoint` matches `checkpoint-N`
exactly) and no rotation (`checkpoint-*`) ever takes for a checkpoint, and which the
next run removes. transformers' own `Trainer._save_checkpoint` writes in place.

A checkpoint damaged after it was published (a copy cut short, a failing disk) is found
before a resume loads it: `damage` reads every file's framing (JSON, safetensors header and
length, torch's zip archive and its CRCs) without loading any weights.

The first Ctrl-C (SIGINT) asks the run to stop after the optimizer step in progress
and to save a checkpoint there; a second one interrupts at once. While the finished run's
files are written (`finish_writing`), a first Ctrl-C waits for them to be whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from zotune.rundir import stamp_checkpoint

logger = logging.getLogger("zotune")
STAGING = ".tmp-" + PREFIX_CHECKPOINT_DIR + "-"  # .tmp-checkpoint-N: a checkpoint being written
TRASH = ".old-" + PREFIX_CHECKPOINT_DIR + "-"  # .old-checkpoint-N: one being replaced by a new checkpoint-N
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"-(\d+)$")


# -- atomic checkpoints ---------------------------------------------------------------------


def save_checkpoint_atomically(trainer, save: Callable, model, trial) -> None:
    """Run the Trainer's `save(model, trial)` (its `_save_checkpoint`) so that `checkpoint-N` appears
    whole or not at all.

    Every process writes its part into the staging directory; after a barrier the main
    process fsyncs it, renames it into place, then rotates old checkpoints as the Trainer
    would have."""
    args = trainer.args
    if args.push_to_hub:  # the hub upload reads the checkpoint folder in the background: leave it where it is
        return save(model, trial)
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging = os.path.join(run_dir, STAGING + str(trainer.state.global_step))
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    trainer.accelerator.wait_for_everyone()

    # the Trainer writes `<run dir>/checkpoint-N`: point its run dir at the staging dir, for this call only
    trainer._get_output_dir = lambda trial=None: staging
    try:
        save(model, trial)
    finally:
        del trainer._get_output_dir
    staged = os.path.join(staging, name)
    _fix_best_checkpoint(trainer, run_dir, staging, staged)
    if args.should_save:
        stamp_checkpoint(run_dir, staged)
    trainer.accelerator.wait_for_everyone()  # every rank's files are in

    if args.should_save:
        fsync_tree(staged)
        publish(staged, os.path.join(run_dir, name))
        os.rmdir(staging)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()


def _fix_best_checkpoint(trainer, run_dir: str, staging: str, staged: str) -> None:
    """The Trainer looked for the best checkpoint in the run dir it was given (the staging dir):
    point `best_model_checkpoint` at the real run dir, and rewrite the saved state if it changed."""
    state, args = trainer.state, trainer.args
    best = state.best_model_checkpoint
    if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
        best = os.path.join(run_dir, os.path.relpath(best, staging))
    elif (args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
          and state.best_global_step):
        candidate = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
        if os.path.exists(candidate):
            best = candidate
    if best != state.best_model_checkpoint:
        state.best_model_checkpoint = best
        if args.should_save and os.path.isfile(os.path.join(staged, TRAINER_STATE)):
            state.save_to_json(os.path.join(staged, TRAINER_STATE))


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then the directories (so the names are durable too)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def publish(staged: str, final: str) -> None:
    """Rename a complete checkpoint into place; an older `final` (a resumed run saving a step again) is replaced."""
    parent = os.path.dirname(final)
    trash = os.path.join(parent, TRASH + _STEP.search(final).group(1))
    if os.path.exists(final):
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(staged, final)
    fsync_dir(parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: str) -> None:
    """Remove what a crash mid-save left in `run_dir`: staging dirs are incomplete and go; a replaced
    checkpoint whose replacement never arrived is complete, and goes back into place."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        path = os.path.join(run_dir, entry)
        if not os.path.isdir(path) or not _STEP.search(entry):
            continue
        if entry.startswith(STAGING):
            logger.warning("zotune: removing %s, a checkpoint that a crash left half-written", path)
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(TRASH):
            final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{_STEP.search(entry).group(1)}")
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)


# -- damaged checkpoints --------------------------------------------------------------------


def damage(checkpoint: Path, state_file: str = TRAINER_STATE) -> str | None:
    """What is wrong with a checkpoint's files, or None when every one reads whole. `state_file`: the
    file every checkpoint of its kind holds (the Trainer's state; the bilevel mode's own)."""
    if not (checkpoint / state_file).is_file():
        return f"{state_file} is missing"
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                _check_safetensors(file)
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:  # torch.save writes a zip archive
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"{bad} fails its CRC")
        except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, struct.error) as e:
            return f"{file.relative_to(checkpoint)}: {e}"
    return None


def _check_safetensors(file: Path) -> None:
    """The header parses and the file is as long as the header says."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > file.stat().st_size:
            raise ValueError("cut short inside its header")
        header = json.loads(f.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size != 8 + length + end:
        raise ValueError(f"{file.stat().st_size} bytes, its header describes {8 + length + end}")


# -- Ctrl-C ---------------------------------------------------------------------------------


class SaveOnInterrupt(TrainerCallback):
    """The first SIGINT during training stops it after the current optimizer step and saves a
    checkpoint there (`checkpoint` is then its path); a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self.checkpoint: str | None = None
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C: KeyboardInterrupt as usual
        # os.write: a handler may run inside a print or a log call, whose locks and buffers it must not reenter
        os.write(2, b"\nzotune: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.requested, self.checkpoint = False, None
        if args.should_save:
            clean_stale(args.output_dir)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.requested, args.device):  # every rank stops at the same step
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed, self._previous = False, None


def _any_rank(flag: bool, device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def save_on_interrupt(trainer) -> SaveOnInterrupt:
    """The trainer's SaveOnInterrupt callback (a ZOTrainer has one), added if it has none."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SaveOnInterrupt):
            return callback
    callback = SaveOnInterrupt()
    trainer.add_callback(callback)
    return callback


def resume_command(run_dir: str | os.PathLike) -> str:
    """The one line that continues the run in `run_dir` (its recipe.yaml holds every override)."""
    return f"zotune train {os.path.join(run_dir, 'recipe.yaml')} train.resume_from_checkpoint=latest"


def exit_interrupted(message: str) -> None:
    """After a run stopped by Ctrl-C: one line saying what was saved; exit 130."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(130)


class _Deferred:
    requested = False


@contextmanager
def finish_writing(what: str) -> Iterator[_Deferred]:
    """Files being written whole: a first Ctrl-C waits for the block to end (`requested` is then
    True), a second one interrupts at once."""
    deferred = _Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield deferred
        return
    message = f"\nzotune: finishing writing {what} first (Ctrl-C again to quit at once)\n".encode()

    def handler(signum, frame):
        deferred.requested = True
        signal.signal(signal.SIGINT, previous)
        os.write(2, message)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield deferred
    finally:
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, previous)
