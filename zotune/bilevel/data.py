"""The K training sources and the validation set of a ScaleBiO run: rows, batches, per-sample losses.

Every training batch is stratified: `per_source_batch_size` rows of each source, in source
order, so that each source's mean loss m_i is measured in every step and the weighted
training loss is L_train(θ; p) = Σ_i p_i m_i(θ). Which rows a step sees is a function of
(seed, step) alone, so a resumed run sees the batches an uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from zotune.data.collate import LeftPadCollator, RightPadCollator, pad_token_id
from zotune.data.files import load_rows
from zotune.data.tasks import (class_values, encode_classification, encode_sft, is_sequence_classifier,
                               label_word_ids, output_logits, require_column)
from zotune.errors import UserError
from zotune.models import forward_accepts
from zotune.schema import BilevelSource, DataSource, Recipe


@dataclass
class Source:
    name: str
    rows: datasets.Dataset  # the (possibly corrupted) rows, as written to the mixture
    encoded: datasets.Dataset  # input_ids, labels
    classes: np.ndarray | None  # class index per row (classification), for balanced batches


def _stable_int(*parts: Any) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def as_data_source(source: BilevelSource, recipe: Recipe) -> DataSource:
    """The `DataSource` a bilevel source reads, filling what it leaves out from `data.train`."""
    base = recipe.data.train
    if source.path is None:
        return DataSource(path=base.path, fallback=base.fallback, split=source.split or base.split, name=base.name)
    return DataSource(path=source.path, fallback=source.fallback, split=source.split or "train",
                      name=source.hub_config)


def _slice(rows: datasets.Dataset, skip: int, max_samples: int | None, key: str) -> datasets.Dataset:
    if skip >= len(rows):
        raise UserError(f"{key}.skip: {skip} skips every one of the {len(rows)} rows")
    end = len(rows) if max_samples is None else min(len(rows), skip + max_samples)
    return rows.select(range(skip, end))


def corrupt_labels(rows: datasets.Dataset, label_field: str, classes: list[str], rate: float, mode: str,
                   seed: int) -> datasets.Dataset:
    """`rows` with a seeded share `rate` of labels replaced: by another class (flip) or a uniform one (random)."""
    if rate == 0:
        return rows
    rng = np.random.default_rng(seed)
    values = list(rows[label_field])
    n = len(values)
    chosen = rng.permutation(n)[: int(round(rate * n))]
    kinds = type(values[0]) if values else str
    for i in chosen:
        current = str(values[i])
        if mode == "flip":
            others = [c for c in classes if c != current]
            new = others[rng.integers(len(others))]
        else:
            new = classes[rng.integers(len(classes))]
        values[i] = kinds(new) if kinds in (int, str) else new
    return rows.remove_columns(label_field).add_column(label_field, values)


class BilevelData:
    """Sources, validation set, collator and the per-sample loss of a recipe's task."""

    def __init__(self, recipe: Recipe, tokenizer, model):
        section, bilevel = recipe.data, recipe.bilevel
        if section.task == "lm":
            raise UserError("data.task: scalebio weights sources of rows (classification or sft), not packed lm blocks")
        self.recipe, self.section, self.seed = recipe, section, recipe.train.seed
        self.encoder = is_sequence_classifier(model)
        raw = []
        for i, source in enumerate(bilevel.sources):
            key = f"bilevel.sources[{i}]"
            rows = load_rows(as_data_source(source, recipe), key)
            raw.append(_slice(rows, source.skip, source.max_samples, key))
        validation = bilevel.validation
        val_rows = load_rows(DataSource(**validation.model_dump(exclude={"skip", "max_samples"})),
                             "bilevel.validation")
        val_rows = _slice(val_rows, validation.skip, validation.max_samples, "bilevel.validation")
        eval_rows = load_rows(section.eval, "data.eval") if section.eval is not None else None

        self.classes: list[str] | None = None
        self.word_ids: list[int] | None = None
        if section.task == "classification":
            if not self.encoder and section.verbalizer is None:
                raise UserError("data.verbalizer: task classification with a causal LM needs label words, "
                                "e.g. verbalizer: {'0': ' terrible', '1': ' great'}")
            for i, rows in enumerate(raw):
                require_column(rows, section.label_field, "data.label_field", f"bilevel.sources[{i}]",
                               bilevel.sources[i].name)
            self.classes = class_values(datasets.concatenate_datasets(raw), section)
            if not self.encoder:
                self.word_ids = label_word_ids(tokenizer, section.verbalizer)
        elif any(s.label_noise for s in bilevel.sources):
            raise UserError("bilevel.sources: label_noise is for task classification")

        self.sources: list[Source] = []
        for i, (source, rows) in enumerate(zip(bilevel.sources, raw)):
            if source.label_noise:
                rows = corrupt_labels(rows, section.label_field, self.classes, source.label_noise,
                                      source.label_noise_mode, _stable_int(self.seed, "label_noise", source.name))
            encoded = self._encode(rows, f"bilevel.sources[{i}]", source.name, tokenizer)
            self.sources.append(Source(source.name, rows, encoded, self._class_array(encoded)))
        self.validation = self._encode(val_rows, "bilevel.validation", "the validation set", tokenizer)
        self.validation_classes = self._class_array(self.validation)
        self.eval = None if eval_rows is None else self._encode(eval_rows, "data.eval", "data.eval", tokenizer)

        pad = pad_token_id(tokenizer)
        if section.task == "classification" and not self.encoder:
            self.collator = LeftPadCollator(pad, forward_accepts(model, "position_ids"),
                                            forward_accepts(model, "logits_to_keep"))
        else:
            self.collator = RightPadCollator(pad)
        self.balanced = section.balanced and self.classes is not None
        if self.balanced:
            for what, size in (("bilevel.per_source_batch_size", bilevel.per_source_batch_size),
                               ("bilevel.validation_batch_size", bilevel.validation_batch_size)):
                if size % len(self.classes):
                    raise UserError(f"{what}: {size} is not a multiple of the {len(self.classes)} classes, "
                                    "as data.balanced needs")

    def _encode(self, rows, key, where, tokenizer) -> datasets.Dataset:
        if self.section.task == "classification":
            return encode_classification(rows, key, where, self.section, tokenizer, self.classes,
                                         self.encoder)
        return encode_sft(rows, key, where, self.section, tokenizer)

    def _class_array(self, encoded) -> np.ndarray | None:
        return np.asarray(encoded["labels"]) if self.classes is not None else None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    # -- batches ----------------------------------------------------------------------

    def _pick(self, rng, size: int, classes: np.ndarray | None, n: int) -> np.ndarray:
        if self.balanced:
            per = size // len(self.classes)
            picks = []
            for k in range(len(self.classes)):
                pool = np.flatnonzero(classes == k)
                if len(pool) == 0:  # a source without this class (e.g. a tiny slice): fill from the rest
                    pool = np.arange(n)
                picks.append(rng.choice(pool, per, replace=len(pool) < per))
            return rng.permutation(np.concatenate(picks))
        return rng.choice(n, size, replace=n < size)

    def train_batch(self, step: int) -> tuple[dict, torch.Tensor]:
        """The shared training batch of `step` and each row's source index."""
        size = self.recipe.bilevel.per_source_batch_size
        features, source_ids = [], []
        for i, source in enumerate(self.sources):
            rng = np.random.default_rng([self.seed, step, i, 1])
            for j in self._pick(rng, size, source.classes, len(source.encoded)):
                features.append(source.encoded[int(j)])
                source_ids.append(i)
        return self.collator(features), torch.tensor(source_ids)

    def validation_batch(self, step: int) -> dict:
        size = self.recipe.bilevel.validation_batch_size
        rng = np.random.default_rng([self.seed, step, 2**20])
        picks = self._pick(rng, size, self.validation_classes, len(self.validation))
        return self.collator([self.validation[int(j)] for j in picks])

    def eval_batches(self, batch_size: int):
        for start in range(0, len(self.eval), batch_size):
            yield self.collator([self.eval[i] for i in range(start, min(start + batch_size, len(self.eval)))])

    # -- losses -----------------------------------------------------------------------

    def per_sample_losses(self, forward: Callable[[dict], Any], batch: dict) -> torch.Tensor:
        """The loss of every row of `batch` under `forward` (the model at w or at u), shape [B]."""
        inputs = dict(batch)
        labels = inputs.pop("labels")
        logits = output_logits(forward(inputs))
        if self.word_ids is not None:
            scores = logits[:, -1, self.word_ids].float()
            return F.cross_entropy(scores, labels.to(scores.device), reduction="none")
        if self.encoder:
            return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
        # sft: mean token loss over each row's completion tokens
        shifted, targets = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
        token = F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        mask = (targets != -100).float()
        return (token * mask).sum(1) / mask.sum(1).clamp(min=1)

    def predictions_correct(self, forward, batch: dict) -> torch.Tensor:
        inputs = dict(batch)
        labels = inputs.pop("labels")
        logits = output_logits(forward(inputs))
        scores = logits[:, -1, self.word_ids] if self.word_ids is not None else logits
        return (scores.argmax(-1).cpu() == labels).float()

    # -- the resampled mixture ------------------------------------------------------------

    def write_mixture(self, path: Path, weights: np.ndarray, size: int, seed: int) -> dict[str, int]:
        """`size` rows drawn from the sources in proportion `weights`, as JSONL; returns rows per source.

        A source's rows are drawn without replacement while they last, then reshuffled."""
        rng = np.random.default_rng([seed, 3])
        counts = rng.multinomial(size, weights / weights.sum())
        out = []
        for source, count in zip(self.sources, counts):
            n = len(source.rows)
            order = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count] if count else []
            for j in order:
                row = dict(source.rows[int(j)])
                row["source"] = source.name
                out.append(row)
        rng.shuffle(out)
        with open(path, "w", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return {s.name: int(c) for s, c in zip(self.sources, counts)}
