"""The trajectory log: one JSON line per optimizer step, enough to rebuild θ from θ₀.

The first line is a header naming the trained parameters, the ones exempt from
weight decay and a hash of their initial values; replay checks that hash so a
log is never applied to the wrong starting point.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from zotune.errors import UserError

FORMAT = "zotune-trajectory/1"
FILENAME = "zo_trajectory.jsonl"


def params_digest(named_params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names and raw bytes of the parameters, in order."""
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrajectoryWriter:
    """Appends step records to `output_dir/zo_trajectory.jsonl`, flushed after every line."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / FILENAME
        self._file = None

    def start(self, step: int, header: dict) -> None:
        """Begin at optimizer step `step`: a fresh log at 0, or keep the records before `step` on resume."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0 or not self.path.exists():
            lines = [json.dumps({"format": FORMAT, "start_step": step, **header})]
        else:
            # a resumed run redoes the steps after its checkpoint: drop their old records
            kept = self.path.read_text().splitlines()
            lines = [kept[0]] + [ln for ln in kept[1:] if json.loads(ln)["step"] < step]
        self.path.write_text("".join(ln + "\n" for ln in lines))
        self._file = self.path.open("a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trajectory(path: str | Path) -> tuple[dict, list[dict]]:
    """Header and step records of a log; a malformed log is a UserError naming the line."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"trajectory not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON line: {e.msg}") from None
    if not rows or rows[0].get("format") != FORMAT:
        raise UserError(f"{path}:1: not a zotune trajectory (expected a header with format {FORMAT!r})")
    header, records = rows[0], rows[1:]
    for i, (a, b) in enumerate(zip(records, records[1:]), start=2):
        if b["step"] != a["step"] + 1:
            raise UserError(f"{path}:{i + 1}: step {b['step']} follows step {a['step']}: the log has a gap")
    return header, records
