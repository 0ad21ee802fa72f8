"""The first-order part of a hybrid step (rule `addax`): which rows of a batch get backprop, and
their gradient g¹ saved beside the trajectory log so that replay can apply it.

Rows (Addax's rule, per batch): activation memory grows with the tokens a forward holds, so the
shortest rows go to backprop, shortest first, while rows × the longest of them stays within the
budget; the rest, and at least one row, take the ZO forwards. A row's length runs from its first
to its last attended or labelled token. The backprop rows are cut to the columns they use, so
short rows cost their own length; what is cut is padding that no token attends to and no label
counts, so the loss is the same. Leading padding is cut only where the batch gives position_ids
(zotune's left-padded classification batches do); otherwise a row runs from column 0.

g¹ is a whole tensor per trained parameter, not a few scalars: each step's is written to
`zo_first_order/step-<step>.safetensors` in the run's output directory (in the gradient's dtype:
4 bytes per trained element per step for fp32 weights), and the step's trajectory record holds its
sha256, so replay refuses a missing or different file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.batch import batch_rows, is_per_row, take_rows
from zotune.data.collate import IGNORED_LABEL
from zotune.errors import UserError
from zotune.trajectory import params_digest

FOLDER = "zo_first_order"


def _spans(inputs: dict, rows: int, width: int) -> list[tuple[int, int]]:
    """Each row's columns [start, end): from its first to its last attended or labelled token. The
    start is 0 unless the batch gives position_ids (a left-padded one): without them a model counts
    leading columns as positions, so they cannot be cut."""
    mask = inputs.get("attention_mask")
    if not (torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == (rows, width)):
        return [(0, width)] * rows
    used = mask != 0
    labels = inputs.get("labels")
    if torch.is_tensor(labels) and labels.shape == mask.shape:
        used = used | (labels != IGNORED_LABEL)
    columns = torch.arange(1, width + 1, device=used.device)
    ends = (used * columns).amax(dim=1)
    positions = inputs.get("position_ids")
    if torch.is_tensor(positions) and positions.shape == mask.shape:
        starts = torch.where(used.any(dim=1), (used * columns.flip(0)).amax(dim=1).neg() + width, 0)
    else:
        starts = torch.zeros_like(ends)
    return list(zip(starts.tolist(), ends.tolist()))


def split_rows(inputs: dict, max_tokens: int) -> tuple[dict | None, dict, int]:
    """(the backprop rows, cut to the columns they use, or None; the ZO rows; the tokens of the first).

    The batch's tensors that have its rows as their first dimension are split; the others go to
    both parts as they are."""
    rows = batch_rows(inputs)
    wide = [v for v in inputs.values() if is_per_row(v, rows) and v.dim() >= 2]
    width = wide[0].shape[1] if wide else 1
    spans = _spans(inputs, rows, width)
    shortest = sorted(range(rows), key=lambda i: spans[i][1] - spans[i][0])

    def columns(taken: int) -> tuple[int, int]:
        """The columns the `taken` shortest rows use, together."""
        chosen = [spans[i] for i in shortest[:taken]]
        return min(start for start, _ in chosen), max(end for _, end in chosen)

    def tokens(taken: int) -> int:
        lo, hi = columns(taken)
        return taken * (hi - lo)

    taken = 0
    while taken < rows - 1 and tokens(taken + 1) <= max_tokens:
        taken += 1
    if not taken:
        return None, inputs, 0
    lo, hi = columns(taken)
    chosen = torch.tensor(sorted(shortest[:taken]))
    rest = torch.tensor(sorted(shortest[taken:]))

    def part(index: torch.Tensor, cut: bool) -> dict:
        def take(v: torch.Tensor) -> torch.Tensor:
            v = v[index.to(v.device)]
            return v[:, lo:hi] if cut and v.dim() >= 2 and v.shape[1] == width else v
        return take_rows(inputs, take, rows)

    return part(chosen, True), part(rest, False), tokens(taken)


def gradients_digest(grads: dict[str, torch.Tensor]) -> str:
    """The sha256 a step's record holds of its g¹ (by name, in name order)."""
    return params_digest(sorted(grads.items()))


def gradients_path(log_dir: str | Path, step: int) -> Path:
    return Path(log_dir) / FOLDER / f"step-{step:08d}.safetensors"


def save_gradients(log_dir: str | Path, step: int, grads: dict[str, torch.Tensor]) -> None:
    """Write one step's g¹ (renamed into place: a crash leaves the previous file or none)."""
    path = gradients_path(log_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    save_file({name: t.detach().contiguous().cpu() for name, t in grads.items()}, str(staging))
    with staging.open("rb") as f:  # durable before a checkpoint that follows can name its step
        os.fsync(f.fileno())
    os.replace(staging, path)


def load_gradients(log_dir: str | Path, record: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The g¹ a step's record names ({} for a step without one), checked against its sha256."""
    digest = record.get("first_order_sha256")
    if digest is None:
        return {}
    path = gradients_path(log_dir, record["step"])
    if not path.is_file():
        raise UserError(f"{path}: missing; step {record['step']} added a first-order gradient (rule "
                        f"{record['rule']!r}) that replay needs, saved there by training")
    grads = load_file(str(path), device=str(device))
    if gradients_digest(grads) != digest:
        raise UserError(f"{path}: differs from the gradient step {record['step']} recorded (sha256 mismatch)")
    return grads
