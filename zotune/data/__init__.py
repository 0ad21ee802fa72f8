"""Data for training: rows from files or the hub, turned into one task's examples and batches.

- `zotune.data.files`: where a source's rows come from; local text files checked before they are read;
- `zotune.data.tasks`: the three tasks (classification, sft, lm): rows to examples, their losses and metrics;
- `zotune.data.collate`: examples to padded batches.

`build_task_data` (everything `transformers.Trainer` needs) and `load_rows` (one source's rows) are
the names most callers use, so they can be imported from here.
"""

from zotune.data.files import load_rows
from zotune.data.tasks import build_task_data

__all__ = ["build_task_data", "load_rows"]
