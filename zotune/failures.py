"""Operational failures (a full disk, a read-only or unwritable folder, an I/O error) in words.

A run writes through Python (the trajectory, JSON files), safetensors (Rust) and `torch.save`
(C++), and each reports a full disk its own way: `OSError(ENOSPC)`, a `SafetensorError` ending
in "(os error 28)", and a `RuntimeError` from torch's archive writer that names no cause at all
("[enforce fail at inline_container.cc] ... unexpected pos"). `describe` recognizes the three and
says how much space the disk has left; anything else is not an operational failure but a bug,
and is left to propagate.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

OPERATIONAL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")


def describe(e: BaseException, folder: Path) -> str | None:
    """`e` as one line if it is an operational failure of writing under `folder`, else None."""
    if isinstance(e, OSError) and e.errno in OPERATIONAL:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or os.strerror(e.errno)}{_space_left(folder, e.errno)}"
    if type(e).__name__ == "SafetensorError" and (m := _OS_ERROR.search(str(e))) and int(m.group(1)) in OPERATIONAL:
        code = int(m.group(1))
        return f"writing a safetensors file: {os.strerror(code)}{_space_left(folder, code)}"
    if isinstance(e, RuntimeError) and any(mark in str(e) for mark in _TORCH_WRITER):
        return f"writing a torch archive (.pt, .bin) failed{_space_left(folder, None)}"
    return None


def _space_left(folder: Path, code: int | None) -> str:
    """How much room the disk of `folder` has, when that may explain the failure."""
    if code not in (None, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ""
    try:
        free = shutil.disk_usage(_existing(folder)).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free on the disk of {folder})"


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
