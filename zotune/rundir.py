"""A run owns its output folder: one writer at a time, and never a run mixed into another's files.

`claim(out, ...)` is the first thing `zotune train` does, before any weights load:

- it takes an exclusive lock on `OUT/.zotune.lock` (flock, released by the kernel when the
  process ends, however it ends): a second `zotune train` into the folder is refused while
  the first runs;
- a new or empty folder starts a run: `OUT/zotune_run.json` records its identity (an id, the
  recipe's sha256, the seed, the start time) before anything else is written there. A folder
  holding only a run's identity and recipe.yaml (a run that failed before it trained) counts as
  empty: nothing in it would be lost;
- a folder holding a run is refused to a new run, with the commands that continue it or start
  over (`--overwrite` removes the earlier run's files first); a folder holding files that are no
  zotune run's is refused even with `--overwrite`, which never deletes what zotune did not write;
- a resumed run keeps the folder's identity. Every checkpoint is stamped with it (a copy of
  `zotune_run.json`, written inside the checkpoint before it is published), and `latest`
  resumes only checkpoints with that stamp: a checkpoint another run left is skipped, with a
  warning naming it.

A folder written before runs had identities (a recipe.yaml, no zotune_run.json) is adopted by
the first resume: it gets an identity and its checkpoints the stamp.
"""

from __future__ import annotations

import datetime
import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError

logger = logging.getLogger("zotune")

IDENTITY = "zotune_run.json"
LOCK = ".zotune.lock"
RECIPE = "recipe.yaml"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what a run writes before it trains: a folder holding only these has nothing to lose
SETUP = (LOCK, IDENTITY, RECIPE, f".tmp-{IDENTITY}", f".tmp-{RECIPE}")


@dataclass
class RunFolder:
    """A claimed output folder: hold it until the run ends, then `release()`."""

    path: Path
    identity: dict
    _lock: object

    @property
    def main(self) -> bool:
        """Whether this process claimed the folder (the others of a torch.distributed run follow it)."""
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run, skipping (with a warning) those another run left."""
        foreign = []
        for step, path in reversed(checkpoints(self.path)):
            if stamp_of(path) == self.identity["id"]:
                return path
            foreign.append(path.name)
        if foreign:
            logger.warning("zotune: %s: skipping %s: not checkpoints of this run (their %s differs or is missing)",
                           self.path, ", ".join(foreign), IDENTITY)
        return None

    def checkpoints_before(self, checkpoint: Path) -> list[tuple[int, Path]]:
        """This run's checkpoints older than `checkpoint`, by step."""
        step = int(m.group(1)) if (m := CHECKPOINT.match(checkpoint.name)) else 0
        return [(s, p) for s, p in checkpoints(self.path) if s < step and stamp_of(p) == self.identity["id"]]

    def check_checkpoint(self, checkpoint: Path) -> None:
        """A checkpoint given by path: inside this folder, it must be one of this run's."""
        inside = checkpoint.resolve().parent == self.path.resolve()
        if inside and stamp_of(checkpoint) != self.identity["id"]:
            raise UserError(f"{checkpoint}: a checkpoint of another run (its {IDENTITY} differs from "
                            f"{self.path / IDENTITY}); resume from a checkpoint of this run, e.g. "
                            "train.resume_from_checkpoint=latest")


def recipe_digest(recipe_text: str) -> str:
    return hashlib.sha256(recipe_text.encode()).hexdigest()


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders in `folder`, by step."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def stamp_of(checkpoint: Path) -> str | None:
    """The run id a checkpoint was stamped with, or None."""
    try:
        return json.loads((checkpoint / IDENTITY).read_text(encoding="utf-8")).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def stamp_checkpoint(run_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Copy the run's identity into a checkpoint being written (nothing when the run has none)."""
    identity = Path(run_dir) / IDENTITY
    if identity.is_file():
        shutil.copyfile(identity, Path(checkpoint) / IDENTITY)


def claim(out: Path, recipe_text: str, *, seed: int, resuming: bool, overwrite: bool) -> RunFolder:
    """Lock OUT and decide whether this run may write there (see the module docstring).

    `recipe_text` is the resolved recipe without its resume setting."""
    if resuming and overwrite:
        raise UserError("--overwrite starts the run over; it cannot go with train.resume_from_checkpoint")
    fresh_lock = not (out / LOCK).exists()
    lock = _lock(out)
    try:
        identity = _identity(out)
        entries = [p for p in out.iterdir() if p.name not in SETUP]
        if resuming and entries:
            if identity is None and not (out / RECIPE).is_file():
                raise UserError(f"{out}: holds files that are not a zotune run's ({entries[0].name}, ...); "
                                "resume into the run's own train.output_dir")
            if identity is None:  # a run from before identities: adopt it
                identity = _write_identity(out, recipe_text, seed)
                for _, checkpoint in checkpoints(out):
                    stamp_checkpoint(out, checkpoint)
            _warn_if_recipe_changed(out, identity, recipe_text)
            return RunFolder(out, identity, lock)
        if entries and not overwrite:
            raise UserError(_occupied(out, identity, entries))
        if entries:
            _remove_run(out, identity, entries)
        return RunFolder(out, _write_identity(out, recipe_text, seed), lock)
    except BaseException:
        if fresh_lock:  # refused: leave the folder as it was found
            (out / LOCK).unlink(missing_ok=True)
        lock.close()
        raise


def _lock(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = (out / LOCK).open("a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{out}: cannot write to train.output_dir: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{out}: another zotune run ({holder}) is writing to this folder; wait for it to end "
                        "or choose another train.output_dir") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
    except BaseException:
        lock.close()
        raise
    return lock


def follow(out: Path) -> RunFolder:
    """OUT as another rank of a torch.distributed run sees it, after the main process claimed it:
    the same run, no lock, nothing of the folder's own to write."""
    return RunFolder(out, _identity(out), None)


def _identity(out: Path) -> dict | None:
    path = out / IDENTITY
    if not path.exists():
        return None
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(identity, dict) or not isinstance(identity.get("id"), str):
            raise ValueError("no run id")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable run identity ({e}); it marks {out} as a zotune run's folder: "
                        f"restore it, or start over with --overwrite") from None
    return identity


def _write_identity(out: Path, recipe_text: str, seed: int) -> dict:
    identity = {
        "id": uuid.uuid4().hex,
        "recipe_sha256": recipe_digest(recipe_text),
        "seed": seed,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe_text,  # as it started: a resume with another recipe is told what changed
    }
    write_whole(out / IDENTITY, json.dumps(identity, indent=1) + "\n")
    return identity


def write_whole(path: Path, text: str) -> None:
    """Write a small file so that it is whole or absent, whatever interrupts the write."""
    staging = path.with_name(f".tmp-{path.name}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def _occupied(out: Path, identity: dict | None, entries: list[Path]) -> str:
    if identity is None and not (out / RECIPE).is_file():
        return (f"{out}: not empty, and what it holds is not a zotune run ({entries[0].name}, ...); "
                "choose a new or empty train.output_dir")
    steps = [step for step, _ in checkpoints(out)]
    held = f"checkpoints {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"checkpoint {steps[0]}" if steps else \
        "no checkpoint"
    started = f" started {identity['started']}" if identity else ""
    return (f"{out}: holds another run{started} ({held}); to continue it: zotune train {out / RECIPE} "
            f"train.resume_from_checkpoint=latest; to start fresh, choose another train.output_dir or pass "
            f"--overwrite (deletes that run's files)")


def _remove_run(out: Path, identity: dict | None, entries: list[Path]) -> None:
    if identity is None and not (out / RECIPE).is_file():
        raise UserError(f"{out}: not empty, and what it holds is not a zotune run ({entries[0].name}, ...); "
                        "--overwrite removes only a zotune run's files: choose a new or empty train.output_dir")
    logger.warning("zotune: --overwrite: removing the earlier run in %s (%d entries)", out, len(entries))
    for entry in [*entries, *(out / name for name in SETUP[1:])]:
        if not entry.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _warn_if_recipe_changed(out: Path, identity: dict, recipe_text: str) -> None:
    if identity.get("recipe_sha256") in (None, recipe_digest(recipe_text)):
        return
    diff = [line[1:].strip() for line in difflib.unified_diff(
        identity.get("recipe", "").splitlines(), recipe_text.splitlines(), lineterm="", n=0)
        if line[:1] == "+" and not line.startswith("+++")]
    changed = f" (now: {'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})" if diff else ""
    logger.warning("zotune: resuming %s with a recipe that differs from the one it started with%s; "
                   "replaying its log reproduces the resumed run", out, changed)
