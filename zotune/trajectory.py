"""The trajectory log: one JSON line per optimizer step, enough to rebuild θ from θ₀.

The first line is a header naming the trained parameters, the ones exempt from
weight decay and a hash of their initial values; replay checks that hash so a
log is never applied to the wrong starting point.

The log is append-only (format `zotune-trajectory/2`). Nothing already written is
ever rewritten, so a crash can cost at most the line being written:

- every step appends one record line ``{"step": k, ...}``, flushed at once, and the
  file is fsynced before each checkpoint is published, so a checkpoint never holds
  weights that are ahead of the durable log;
- a resumed run appends a marker line ``{"resume": S}``: it restarted from the
  checkpoint of step S and redoes the steps from S on. Readers drop the earlier
  records of steps >= S; the records after the marker supersede them;
- a crash may leave a torn last line (no newline, not valid JSON). Readers ignore
  it with a warning; a resumed run first ends it with a newline, so such a fragment
  can also sit right before a resume marker. A malformed line anywhere else is an
  error naming the line.

Version 1 logs (no markers, rewritten on resume) read unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from zotune.errors import UserError

FORMAT = "zotune-trajectory/2"
FORMATS = ("zotune-trajectory/1", FORMAT)  # the formats read_trajectory accepts
FILENAME = "zo_trajectory.jsonl"
RESUME = "resume"  # key of a resume marker line: {"resume": S}

logger = logging.getLogger("zotune")


def params_digest(named_params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names and raw bytes of the parameters, in order."""
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()


class TrajectoryWriter:
    """Appends step records to `output_dir/zo_trajectory.jsonl`, flushed after every line.

    Only the main process of a run writes one (the trainer creates it there alone)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / FILENAME
        self._file = None

    def start(self, step: int, header: dict) -> None:
        """Begin at optimizer step `step`: a fresh log at 0 (or when there is none), else append a resume marker."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0 or not self.path.exists() or self.path.stat().st_size == 0:
            # a new run: its log starts over (what a previous run in this directory left is not its history)
            self._file = self.path.open("w", encoding="utf-8")
            self._write({"format": FORMAT, "start_step": step, **header})
        else:
            _warn_if_header_differs(self.path, header, step)
            self._file = self.path.open("a", encoding="utf-8")
            if not _ends_with_newline(self.path):
                self._file.write("\n")  # end the torn line a crash left: the marker starts a line of its own
            self._write({RESUME: step})
        self.sync()

    def append(self, record: dict) -> None:
        self._write(record)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make every line written so far durable (called before each checkpoint is published)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _warn_if_header_differs(path: Path, header: dict, step: int) -> None:
    """A resumed run appends to the log of the run it continues: say so if their settings differ."""
    try:
        with path.open(encoding="utf-8") as f:
            logged = json.loads(f.readline())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # read_trajectory reports a broken header
    differs = [key for key in ("params", "no_decay", "optimizer") if logged.get(key) != header.get(key)]
    if differs:
        logger.warning(
            "zotune: resuming at step %d with %s different from the ones %s was started with; "
            "replaying that log past step %d will not reproduce this run", step, ", ".join(differs), path, step
        )


def read_trajectory(path: str | Path) -> tuple[dict, list[dict]]:
    """Header and step records of a log, resume markers applied; a malformed log is a UserError naming the line.

    A torn line that a crash left (the last one, or one right before a resume marker) is
    skipped with a warning. The records returned are consecutive steps from the header's
    `start_step`, each as the last run that reached it recorded it."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"trajectory not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file: {e.reason} at byte {e.start}") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line

    rows: list[tuple[int, dict]] = []
    torn: list[int] = []
    for lineno, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError is a ValueError
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            if lineno > 1 and (lineno == len(lines) or _is_resume_marker(lines[lineno])):
                torn.append(lineno)
                continue
            raise UserError(f"{path}:{lineno}: not a JSON line: {msg}") from None
        rows.append((lineno, row))
    if torn:
        logger.warning(
            "zotune: %s: ignoring the torn line%s %s that an interrupted run left",
            path, "s" if len(torn) > 1 else "", ", ".join(map(str, torn)),
        )

    if not rows or rows[0][0] != 1 or rows[0][1].get("format") not in FORMATS:
        raise UserError(f"{path}:1: not a zotune trajectory (expected a header with format {FORMAT!r})")
    header = rows[0][1]
    start = header.get("start_step", 0)
    records: list[dict] = []
    for lineno, row in rows[1:]:
        if RESUME in row:
            at = row[RESUME]
            if not isinstance(at, int) or at < start:
                raise UserError(f"{path}:{lineno}: resume marker at step {at!r}, before the log's start {start}")
            while records and records[-1]["step"] >= at:  # redone by the resumed run: superseded
                records.pop()
            expected = records[-1]["step"] + 1 if records else start
            if at > expected:
                raise UserError(f"{path}:{lineno}: a run resumed at step {at}, but the log ends before step "
                                f"{expected}: the log has a gap")
            continue
        if not isinstance(row.get("step"), int):
            raise UserError(f"{path}:{lineno}: not a step record (no integer 'step')")
        expected = records[-1]["step"] + 1 if records else start
        if row["step"] != expected:
            after = f"follows step {records[-1]['step']}" if records else f"comes first, not step {start}"
            raise UserError(f"{path}:{lineno}: step {row['step']} {after}: the log has a gap")
        records.append(row)
    return header, records


def _is_resume_marker(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and RESUME in row
