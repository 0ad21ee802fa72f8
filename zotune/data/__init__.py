"""Data for training: rows from files or the hub, turned into one task's examples and batches.

- `zotune.data.files`: where a source's rows come from; local text files checked before they are read;
- `zotune.data.tasks`: the three tasks (classification, sft, lm): rows to examples, their losses and metrics;
- `zotune.data.collate`: examples to padded batches.

`build_task_data` (everything `transformers.Trainer` needs) and `load_rows` (one source's rows) are
the names most callers use, so they can be imported from here. They load on first use: the
tasks import transformers' models, which the optimizer's import (through `zotune.data.collate`)
must not pay for.
"""

import importlib

_HOMES = {"build_task_data": "zotune.data.tasks", "load_rows": "zotune.data.files"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
