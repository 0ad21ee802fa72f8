"""The trajectory log: one JSON line per optimizer step, enough to rebuild θ from θ₀.

The first line is a header naming the trained parameters, the ones exempt from
weight decay and a hash of their initial values; replay checks that hash so a
log is never applied to the wrong starting point.

The log is append-only (format `zotune-trajectory/3`). Nothing already written is
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

Every line carries a checksum, ``"chain"``: the sha256 of the checksum it follows and
of the line's canonical JSON without it (`chain_link`). The header follows its own
`init_sha256`, a record the line before it, and a resume marker the last record it
keeps (or the header), so the records in force form one chain from the initial
weights. An edited, dropped, added or reordered line, or one copied from another
run's log, breaks the chain there: readers and resumed runs refuse it, naming the
line. The chain catches mistakes and mixed-up files, not forgery: anyone can
recompute it.

Version 1 logs (no markers, rewritten on resume) and version 2 logs (markers, no
checksums) read as before, with no chain to check; a run resumed on one continues it
unchained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zotune.errors import UserError

FORMAT = "zotune-trajectory/3"
FORMATS = ("zotune-trajectory/1", "zotune-trajectory/2", FORMAT)  # the formats read_trajectory accepts
FILENAME = "zo_trajectory.jsonl"
RESUME = "resume"  # key of a resume marker line: {"resume": S}
CHAIN = "chain"  # key of a line's checksum

logger = logging.getLogger("zotune")


def params_digest(named_params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names and raw bytes of the parameters, in order."""
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()


def chain_link(row: dict, previous: str) -> str:
    """The checksum of a log line that follows the checksum `previous`."""
    body = json.dumps({k: v for k, v in row.items() if k != CHAIN}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((previous + body).encode()).hexdigest()


def _chain_origin(header: dict) -> str:
    """What the header's checksum follows: the initial weights' hash it names."""
    return str(header.get("init_sha256", ""))


class TrajectoryWriter:
    """Appends step records to `output_dir/zo_trajectory.jsonl`, flushed after every line.

    Only the main process of a run writes one (the trainer creates it there alone)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / FILENAME
        self._file = None
        self._previous: str | None = None  # the checksum the next line follows; None: an unchained log

    def start(self, step: int, header: dict) -> None:
        """Begin at optimizer step `step`: a fresh log at 0 (or when there is none), else append a resume marker
        chained onto the records it keeps, after checking the chain of the log it continues."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0 or not self.path.exists() or self.path.stat().st_size == 0:
            # a new run: its log starts over (what a previous run in this directory left is not its history)
            self._file = self.path.open("w", encoding="utf-8")
            row = {"format": FORMAT, "start_step": step, **header}
            self._previous = _chain_origin(row)
            self._write(row)
        else:
            log = _read(self.path)
            _warn_if_header_differs(self.path, log.header, header, step)
            log.resume(step, str(self.path))
            self._previous = log.tip
            self._file = self.path.open("a", encoding="utf-8")
            if not _ends_with_newline(self.path):
                self._file.write("\n")  # end the torn line a crash left: the marker starts a line of its own
            self._write({RESUME: step})
        self.sync()

    def append(self, record: dict) -> None:
        self._write(record)

    def _write(self, row: dict) -> None:
        if self._previous is not None:
            self._previous = chain_link(row, self._previous)
            row = {**row, CHAIN: self._previous}
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


def _warn_if_header_differs(path: Path, logged: dict, header: dict, step: int) -> None:
    """A resumed run appends to the log of the run it continues: say so if their settings differ."""
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
    `start_step`, each as the last run that reached it recorded it, without their checksums."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"trajectory not found: {path}")
    log = _read(path)
    return _unchained(log.header), [_unchained(r) for r in log.records]


def _unchained(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != CHAIN}


@dataclass
class _Log:
    """A log as read so far: its header, the records in force, and the checksum the next line must follow."""

    path: Path
    header: dict
    records: list[dict] = field(default_factory=list)  # each with its checksum, if the log is chained
    tip: str | None = field(init=False)  # None: an unchained log

    def __post_init__(self):
        self.tip = _chain_origin(self.header)
        self.follow(self.header, 1, "the header")

    @property
    def chained(self) -> bool:
        # a checksum in the header also counts: a /3 header edited to say /2 still has its chain checked
        return self.header["format"] == FORMAT or CHAIN in self.header

    def follow(self, row: dict, lineno: int, what: str) -> None:
        """Move the chain on to `row`; a line of a chained log whose checksum does not follow is refused."""
        if self.chained and row.get(CHAIN) != chain_link(row, self.tip or ""):
            if lineno == 1:
                raise UserError(f"{self.path}:1: the header does not match its checksum (edited, or written by "
                                "another zotune); this log cannot be trusted")
            raise UserError(f"{self.path}:{lineno}: {what} does not match the log's checksum chain (edited, or "
                            f"written by another run); the records before line {lineno} are intact")
        self.tip = row.get(CHAIN)

    def resume(self, at: int, where: str) -> None:
        """Drop the records that a run resumed at step `at` redoes; its marker follows the last record kept."""
        start = self.header.get("start_step", 0)
        if not isinstance(at, int) or at < start:
            raise UserError(f"{where}: resume marker at step {at!r}, before the log's start {start}")
        while self.records and self.records[-1]["step"] >= at:  # redone by the resumed run: superseded
            self.records.pop()
        expected = self.records[-1]["step"] + 1 if self.records else start
        if at > expected:
            raise UserError(f"{where}: a run resumed at step {at}, but the log ends before step {expected}: "
                            "the log has a gap")
        self.tip = (self.records[-1] if self.records else self.header).get(CHAIN)

    def add(self, row: dict, lineno: int) -> None:
        """A step record, checked against the chain and the step before it."""
        if not isinstance(row.get("step"), int):
            raise UserError(f"{self.path}:{lineno}: not a step record (no integer 'step')")
        self.follow(row, lineno, f"record of step {row['step']}")
        last = self.records[-1] if self.records else None
        expected = last["step"] + 1 if last else self.header.get("start_step", 0)
        if row["step"] != expected:
            after = f"follows step {last['step']}" if last else f"comes first, not step {expected}"
            raise UserError(f"{self.path}:{lineno}: step {row['step']} {after}: the log has a gap")
        self.records.append(row)


def _read(path: Path) -> _Log:
    """The log at `path`, every line checked (its chain too, from format 3 on)."""
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
    log = _Log(path, rows[0][1])
    for lineno, row in rows[1:]:
        if RESUME in row:
            log.resume(row[RESUME], f"{path}:{lineno}")
            log.follow(row, lineno, f"the resume marker at step {row[RESUME]}")
        else:
            log.add(row, lineno)
    return log


def _is_resume_marker(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and RESUME in row
