"""The one rule for the folder a command writes a model into (`zotune replay`, `zotune export`).

OUT_DIR is never a folder the run lives in (its directory, the checkpoint or base it reads
from), even with --force: writing there would replace the trained weights. A non-empty
OUT_DIR needs --force, and then the weight files of either kind it holds are removed
first, so it never holds an adapter beside a full model (transformers would load the adapter).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from zotune.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
STALE_WEIGHTS = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin", *FULL_WEIGHTS)
STALE_SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def prepare_out_dir(out_dir: str, protected: Mapping[Path, str], force: bool) -> Path:
    """OUT_DIR, checked before anything is written: none of the `protected` folders (each mapped to what it
    is, for the message), and empty unless `force` (then its old weight files go)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out.exists():
        for folder, what in protected.items():
            if out.resolve() == folder.expanduser().resolve():
                raise UserError(f"{out_dir}: is {what}; write to another directory (--force never allows that)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out_dir}: exists and is not empty; pass --force to write into it")
        _remove_weight_files(out)
    return out


def _remove_weight_files(out: Path) -> None:
    stale = [out / name for name in STALE_WEIGHTS]
    stale += [p for pattern in STALE_SHARDS for p in out.glob(pattern)]
    for path in stale:
        if path.is_file():
            path.unlink()
