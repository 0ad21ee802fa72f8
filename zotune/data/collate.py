"""Batches from tokenized examples: padding, attention masks and labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

INDEX = "example_index"  # the dataset column, and batch key, of a row's position in its data file
PROMPT = "prompt"  # data.task reward: the column, and batch key, of a row's filled template
IGNORED_LABEL = -100  # a token label that no loss counts (transformers' convention)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass
class LeftPadCollator:
    """Left padding so that the last position of every row is its last prompt token."""

    pad_id: int
    position_ids: bool = True
    logits_to_keep: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, width - n :] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[row, width - n :] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.position_ids:
            # without them absolute-position models (GPT-2, OPT) would count the padding as positions
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        batch["labels"] = torch.as_tensor([f["labels"] for f in features], dtype=torch.long)
        if self.logits_to_keep:
            batch["logits_to_keep"] = 1  # only the last position is scored; skips the LM head elsewhere
        return batch


@dataclass
class RightPadCollator:
    """Right padding; token labels (lists) are padded with -100, class labels (ints) are stacked."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        token_labels = np.ndim(features[0]["labels"]) > 0
        labels = torch.full((len(features), width), -100, dtype=torch.long) if token_labels else None
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            if token_labels:
                labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        if not token_labels:
            labels = torch.as_tensor([f["labels"] for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class IndexedCollator:
    """A data collator whose batches also carry their rows' dataset indices (`INDEX`), which the
    wrapped collator, picking its own columns, would drop."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features: Sequence[dict]) -> dict:
        batch = self.collator(features)
        if features and INDEX in features[0] and INDEX not in batch:
            batch[INDEX] = torch.tensor([f[INDEX] for f in features], dtype=torch.long)
        return batch
