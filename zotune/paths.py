"""Paths the user writes in a recipe: `~` expanded, what kind of thing is there, and which look local.

Both the recipe loader (files a recipe names must exist) and the data loader (where a source's
rows come from) ask these questions, so they are answered here once.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
LOCAL_PREFIXES = ("./", "../", "/", "~")


def cache_root() -> Path:
    """Where zotune keeps what it builds once per machine: `$ZOTUNE_CACHE`, else ~/.cache/zotune."""
    return Path(os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune").expanduser()


def expand_path(path: str) -> Path:
    """`path` with ~ expanded; as given when it cannot be (`~nosuchuser`, no HOME)."""
    try:
        return Path(path).expanduser()
    except (RuntimeError, KeyError, ValueError):  # no such user, no HOME, a NUL byte
        return Path(path)


def path_kind(path: Path) -> str | None:
    """"file", "directory", "special" (device, FIFO, socket), or None when it cannot be found.

    Never raises: a name too long, a NUL byte or a denied permission count as not found.
    Nothing is opened, so a FIFO or a device cannot block or stream forever."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return "file"
    return "directory" if stat.S_ISDIR(mode) else "special"


def looks_local(path: Any) -> bool:
    """Whether a recipe's path names a local file or folder rather than a hub name."""
    return isinstance(path, str) and (path.startswith(LOCAL_PREFIXES) or path.lower().endswith(LOCAL_SUFFIXES))
