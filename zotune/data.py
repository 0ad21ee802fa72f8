"""Rows to tokenized datasets, collators and losses for the three tasks.

- classification: a prompt scored on one label word per class (MeZO-style) for causal LMs, or the
  model's own head for `...ForSequenceClassification` models;
- sft: prompt + completion, loss on the completion only;
- lm: texts packed into fixed-size blocks.

Files are read with `datasets`, whose caches go to `datasets.config.HF_DATASETS_CACHE`, never next
to the data files.

Local text files (.jsonl, .json, .csv, .txt) are checked first, in one streaming pass: they must be
UTF-8 (a UTF-8 BOM is allowed; UTF-16, Latin-1 and other encodings are refused at the first bad line),
and a .jsonl file must hold one JSON object per line (blank lines are skipped), without duplicate keys,
each column of one JSON type. A row without a value (missing or null) for a column the task reads is
an error naming its line. Nothing is dropped silently: examples longer than `data.max_length` are
truncated with a warning that counts them (classification keeps the end of the prompt, where the
label is scored; sft keeps the start and drops rows whose prompt alone fills the context), and lm
packing warns about the tail shorter than one block.
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from zotune.errors import UserError
from zotune.models import forward_accepts
from zotune.paths import expand_path, path_kind
from zotune.schema import DataSection, DataSource

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
# the file line of each row of the JSONL files read, by the name errors give them (`describe`)
_ROW_LINES: dict[str, list[int]] = {}


@dataclass
class TaskData:
    train_dataset: datasets.Dataset
    eval_dataset: datasets.Dataset | None
    data_collator: Callable
    compute_loss_func: Callable | None
    compute_metrics: Callable | None
    preprocess_logits_for_metrics: Callable | None
    sequential_sampling: bool
    metric: str


# ---------------------------------------------------------------- loading


def describe(source: DataSource) -> str:
    """Where `source`'s rows come from, as error messages name it."""
    path = expand_path(source.path)
    if path_kind(path) is not None:
        return str(path)
    name = source.fallback or source.path
    config = f", config {source.name!r}" if source.name else ""
    return f"hub dataset {name!r} (split {source.split!r}{config})"


def _load_named(name: str, source: DataSource, key: str) -> datasets.Dataset:
    """A hub dataset, or a local folder of data files."""
    try:
        return datasets.load_dataset(name, source.name, split=source.split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"{key}.path: cannot load dataset {name!r} (split {source.split!r}): {e}") from e


def load_rows(source: DataSource, key: str) -> datasets.Dataset:
    """The rows of one data source; `key` ("data.train") is the recipe key named in errors."""
    path = expand_path(source.path)
    kind = path_kind(path)
    if kind == "file":
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(
                f"{key}.path: {path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_BUILDERS)})"
            )
        if path.stat().st_size == 0:
            raise UserError(f"{key}: {path}: the file is empty")
        options = {}
        if path.suffix.lower() in TEXT_SUFFIXES:
            lines = check_text_file(path, key)
            if lines is not None:
                _ROW_LINES[str(path)] = lines
            if builder == "text":
                options["encoding"] = "utf-8-sig"  # a BOM is not part of the first line's text
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as e:  # noqa: BLE001 -- any failure to parse the user's file is reported as theirs
            raise UserError(f"{key}: cannot read {path}: {type(e).__name__}: {e}{_cause(e)}") from e
    elif kind == "directory":
        rows = _load_named(str(path), source, key)
    elif kind == "special":
        raise UserError(f"{key}.path: {source.path} is a device, FIFO or socket, not a data file")
    elif source.fallback:
        logger.info("%s: %s not found, reading hub dataset %r", key, path, source.fallback)
        rows = _load_named(source.fallback, source, key)
    elif path.suffix.lower() in LOCAL_BUILDERS or source.path.startswith((".", "/", "~")):
        looked = "" if str(path) == source.path else f" (looked for {path.absolute()})"
        raise UserError(f"{key}.path: file not found: {source.path}{looked}")
    else:
        rows = _load_named(source.path, source, key)

    if source.max_samples is not None:
        rows = rows.select(range(min(source.max_samples, len(rows))))
    if len(rows) == 0:
        raise UserError(f"{key}: {describe(source)} has no rows")
    return rows


def _cause(e: BaseException) -> str:
    """datasets wraps the parser's error: show that too, it says what is wrong."""
    cause = e.__cause__ or e.__context__
    return f" ({type(cause).__name__}: {cause})" if cause is not None and str(cause) not in str(e) else ""


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return row


def check_text_file(path: Path, key: str) -> list[int] | None:
    """Check a local text data file in one streaming pass; for JSONL, return the line of each row.

    UTF-8 only (a BOM is allowed); a .jsonl file holds one JSON object per line (blank lines
    are skipped), without duplicate keys, and each column holds values of one JSON type (or
    null). Raises `UserError` naming the file and the line of the first problem."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head == b"\x00\x00\xfe\xff":
        raise UserError(f"{key}: {path}:1: the file is UTF-16 or UTF-32 encoded; zotune reads UTF-8 "
                        "(convert it, e.g. `iconv -f UTF-16 -t UTF-8`)")
    jsonl = path.suffix.lower() == ".jsonl"
    lines: list[int] = []
    kinds: dict[str, tuple[str, int]] = {}  # column -> (JSON type, first line with it)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{key}: {path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); zotune "
                    "reads UTF-8 text: convert the file (from Latin-1: `iconv -f LATIN1 -t UTF-8`)"
                ) from None
            if "\x00" in text:
                raise UserError(f"{key}: {path}:{number}: a NUL byte: the file is binary, or UTF-16 without a BOM; "
                                "zotune reads UTF-8 text")
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not jsonl or not text.strip():
                continue
            try:
                row = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, a key twice, an int too long, too deep
                cut = "" if raw.endswith(b"\n") else " (the file ends inside this line: was it cut short?)"
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise UserError(f"{key}: {path}:{number}: not a valid JSON line: {reason}{cut}") from None
            if not isinstance(row, dict):
                raise UserError(f"{key}: {path}:{number}: expected one JSON object {{...}} per line, "
                                f"got a {_json_kind(row)}")
            for column, value in row.items():
                kind = _json_kind(value)
                first = kinds.setdefault(column, (kind, number)) if kind != "null" else (kind, number)
                if first[0] != kind and kind != "null":
                    raise UserError(f"{key}: {path}:{number}: {column!r} is a {kind} here but a {first[0]} at line "
                                    f"{first[1]}; every row must give a column the same type")
            lines.append(number)
    if jsonl and not lines:
        raise UserError(f"{key}: {path}: no rows (the file holds only blank lines)")
    return lines if jsonl else None


def _at(where: str, row: int) -> str:
    """`where` and row (0-based), with the file's line when it is a JSONL file."""
    lines = _ROW_LINES.get(where)
    return f"{where} row {row} (line {lines[row]})" if lines is not None and row < len(lines) else f"{where} row {row}"


def _check_values(rows: datasets.Dataset, columns: list[str], data_key: str, where: str) -> None:
    """Every row has a value (not missing, not null) in each of `columns` that the task reads."""
    table = rows.with_format("arrow")
    for column in dict.fromkeys(columns):
        if column not in rows.column_names:
            continue
        values = table[column]
        if values.null_count:
            first = pc.index(pc.is_null(values), True).as_py()
            raise UserError(
                f"{data_key}: {_at(where, first)}: no value for {column!r} (missing or null; {values.null_count} of "
                f"{len(rows)} rows); fill it in or remove those rows"
            )


# ---------------------------------------------------------------- checks shared by the tasks


def require_column(rows: datasets.Dataset, column: str, field_key: str, data_key: str, where: str) -> None:
    if column not in rows.column_names:
        raise UserError(
            f"{data_key}: {where}: column {column!r} not found (columns: {', '.join(rows.column_names)}); "
            f"set {field_key}"
        )


def _check_template(template: str, rows: datasets.Dataset, data_key: str, where: str) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"data.template: {template!r} is not a valid format string: {e}") from e
    for field in fields:
        column = re.split(r"[.\[]", field, maxsplit=1)[0]
        if re.search(r"\.\s*_", field):
            raise UserError(f"data.template: {template!r}: {{{field}}} reads a private attribute; "
                            "a template fills in column values, e.g. {text}")
        if column == "" or column.isdigit():
            raise UserError(f"data.template: {template!r}: use column names in braces, e.g. {{text}}, not {{{field}}}")
        if column not in rows.column_names:
            raise UserError(
                f"data.template: column {column!r} not found in {where} ({data_key}) "
                f"(columns: {', '.join(rows.column_names)})"
            )
    return [re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields]


def _fill(template: str, batch: dict[str, list]) -> list[str]:
    columns = list(batch)
    try:
        return [template.format(**dict(zip(columns, values))) for values in zip(*batch.values())]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"data.template: {template!r} cannot be filled from a row: {type(e).__name__}: {e}") from e


def is_sequence_classifier(model) -> bool:
    return model is not None and type(model).__name__.endswith("ForSequenceClassification")


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# ---------------------------------------------------------------- collators, losses, metrics


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


def output_logits(outputs) -> torch.Tensor:
    """The logits from a model output, a tuple of outputs (Trainer's prediction_step) or a tensor."""
    if torch.is_tensor(outputs):
        return outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs["logits"]


def label_word_loss(outputs, labels, num_items_in_batch=None, *, label_word_ids: list[int]) -> torch.Tensor:
    """Cross entropy over the label words' logits at the last position, mean over the batch.

    `num_items_in_batch` is ignored: for causal LMs transformers counts `labels[..., 1:]`, which
    for one class index per row is the batch size minus one.
    """
    scores = output_logits(outputs)[:, -1, label_word_ids].float()
    return F.cross_entropy(scores, labels.to(scores.device))


def label_word_logits(logits, labels, *, label_word_ids: list[int]) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep only the label words' logits at the last position."""
    return output_logits(logits)[:, -1, label_word_ids]


def accuracy(prediction) -> dict[str, float]:
    scores = prediction.predictions
    if isinstance(scores, (tuple, list)):
        scores = scores[0]
    return {"accuracy": float((np.asarray(scores).argmax(-1) == np.asarray(prediction.label_ids)).mean())}


# ---------------------------------------------------------------- classification


def class_values(rows: datasets.Dataset, section: DataSection) -> list[str]:
    if section.verbalizer is not None:
        return list(section.verbalizer)
    values = set(rows[section.label_field])
    try:
        ordered = sorted(values)
    except TypeError:
        ordered = sorted(values, key=str)
    return [str(v) for v in ordered]


def _class_indices(rows: datasets.Dataset, section: DataSection, classes: list[str], where: str) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for row, value in enumerate(rows[section.label_field]):
        i = index.get(str(value))
        if i is None:
            key, what = (("data.verbalizer", "has no label word") if section.verbalizer is not None
                         else ("data.label_field", "is not a label of data.train"))
            raise UserError(f"{key}: label {str(value)!r} in {_at(where, row)} (column {section.label_field!r}) "
                            f"{what} (known: {', '.join(classes)})")
        out.append(i)
    return out


def label_word_ids(tokenizer, verbalizer: dict[str, str]) -> list[int]:
    ids = []
    for label, word in verbalizer.items():
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise UserError(
                f"data.verbalizer: label word {word!r} (label {label!r}) is {len(tokens)} tokens {tokens} for this "
                "tokenizer; each label word must be exactly one token (a leading space often helps)"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"data.verbalizer: two label words are the same token: {verbalizer}")
    return ids


def _keep_end(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """Truncate from the left, keeping a leading BOS: the scored position is the last token."""
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (max_length - len(head)) :]


def classification_labels(rows, data_key, where, section, classes) -> list[int]:
    """The class index of every row, after checking the columns the task reads (no tokenizer needed)."""
    require_column(rows, section.label_field, "data.label_field", data_key, where)
    columns = _check_template(section.template, rows, data_key, where)
    _check_values(rows, [section.label_field, *columns], data_key, where)
    return _class_indices(rows, section, classes, where)


def encode_classification(rows, data_key, where, section, tokenizer, classes, encoder: bool):
    labels = classification_labels(rows, data_key, where, section, classes)

    def encode(batch, indices):
        prompts = _fill(section.template, batch)
        full = tokenizer(prompts)["input_ids"]
        if encoder:  # the tokenizer truncates, keeping its own special tokens ([CLS] ... [SEP])
            input_ids = tokenizer(prompts, truncation=True, max_length=section.max_length)["input_ids"]
        else:
            input_ids = [_keep_end(ids, section.max_length, tokenizer.bos_token_id) for ids in full]
        return {"input_ids": input_ids, "labels": [labels[i] for i in indices],
                "truncated": [len(ids) > section.max_length for ids in full]}

    encoded = rows.map(encode, batched=True, with_indices=True, remove_columns=rows.column_names,
                       desc=f"Tokenizing {data_key}")
    kept = "kept their last tokens, where the label is scored" if not encoder else "cut at the end"
    return _warn_truncated(encoded, data_key, where, section.max_length, kept)


def _warn_truncated(encoded, data_key, where, max_length, how) -> datasets.Dataset:
    truncated = sum(encoded["truncated"])
    if truncated:
        logger.warning("%s: %d of %d examples of %s are longer than data.max_length=%d tokens: %s",
                       data_key, truncated, len(encoded), where, max_length, how)
    return encoded.remove_columns("truncated")


def _balanced_order(labels: np.ndarray, num_classes: int, batch_size: int, num_rows: int | None, seed: int):
    """Row indices whose every run of `batch_size` holds batch_size/K rows of each class."""
    per_class = batch_size // num_classes
    pools = [np.flatnonzero(labels == k) for k in range(num_classes)]
    if num_rows is None:
        num_batches = max(1, min(len(p) for p in pools) // per_class)
    else:
        num_batches = max(1, -(-num_rows // batch_size))
    need = num_batches * per_class
    rng = np.random.default_rng(seed)
    columns = []
    for pool in pools:  # each class is drawn without replacement, reshuffled on every pass
        passes = -(-need // len(pool))
        draws = np.concatenate([rng.permutation(pool) for _ in range(passes)])[:need]
        columns.append(draws.reshape(num_batches, per_class))
    batches = rng.permuted(np.concatenate(columns, axis=1), axis=1)
    return batches.reshape(-1)


def classification_classes(section, train_rows, *, encoder: bool, batch_size: int) -> list[str]:
    """The classes of a classification task, after the checks on data.train that need no tokenizer or weights."""
    train_where = describe(section.train)
    if not encoder and section.verbalizer is None:
        raise UserError("data.verbalizer: task classification with a causal LM needs label words, "
                        "e.g. verbalizer: {'0': ' terrible', '1': ' great'}")
    require_column(train_rows, section.label_field, "data.label_field", "data.train", train_where)
    classes = class_values(train_rows, section)
    if section.balanced and batch_size % len(classes):
        raise UserError(
            f"train.per_device_train_batch_size: {batch_size} is not a multiple of the {len(classes)} classes "
            f"({', '.join(classes)}) of {train_where}, as data.balanced needs"
        )
    return classes


def check_rows(section: DataSection, train_rows, eval_rows, *, encoder: bool, batch_size: int) -> list[str] | None:
    """Every rule on the rows of `section`'s task that needs neither a tokenizer nor weights; the classes
    of a classification task.

    `encoder`: the model is a `...ForSequenceClassification` (it scores its own head, not label words)."""
    if section.task == "classification":
        classes = classification_classes(section, train_rows, encoder=encoder, batch_size=batch_size)
        train_where = describe(section.train)
        labels = np.asarray(classification_labels(train_rows, "data.train", train_where, section, classes))
        if eval_rows is not None:
            classification_labels(eval_rows, "data.eval", describe(section.eval), section, classes)
        if section.balanced:
            for k, c in enumerate(classes):
                if not (labels == k).any():
                    raise UserError(f"data.balanced: class {c!r} has no rows in {train_where}")
        return classes
    check = sft_columns if section.task == "sft" else _lm_columns
    check(train_rows, "data.train", describe(section.train), section)
    if eval_rows is not None:
        check(eval_rows, "data.eval", describe(section.eval), section)
    return None


def _classification(section, tokenizer, model, train_rows, eval_rows, classes, *, seed, batch_size, num_rows_needed):
    train_where = describe(section.train)
    encoder = is_sequence_classifier(model)
    if encoder:
        num_labels = model.config.num_labels
        if num_labels != len(classes):
            raise UserError(
                f"data.verbalizer: {len(classes)} classes ({', '.join(classes)}) in {train_where}, but the model's "
                f"classifier has {num_labels} outputs (model.config.num_labels)"
            )
    word_ids = None if encoder else label_word_ids(tokenizer, section.verbalizer)

    train = encode_classification(train_rows, "data.train", train_where, section, tokenizer, classes, encoder)
    evaluation = None
    if eval_rows is not None:
        evaluation = encode_classification(eval_rows, "data.eval", describe(section.eval), section, tokenizer,
                                            classes, encoder)
    if section.balanced:
        train = train.select(_balanced_order(np.asarray(train["labels"]), len(classes), batch_size,
                                             num_rows_needed, seed))

    pad_id = pad_token_id(tokenizer)
    if encoder:
        return TaskData(train, evaluation, RightPadCollator(pad_id), None, accuracy, None,
                        section.balanced, "accuracy")
    collator = LeftPadCollator(pad_id, forward_accepts(model, "position_ids"),
                               forward_accepts(model, "logits_to_keep"))
    return TaskData(train, evaluation, collator, partial(label_word_loss, label_word_ids=word_ids), accuracy,
                    partial(label_word_logits, label_word_ids=word_ids), section.balanced, "accuracy")


# ---------------------------------------------------------------- sft and lm


def sft_columns(rows, data_key, where, section) -> None:
    """The completion column and the template's columns exist and have a value in every row."""
    require_column(rows, section.completion_field, "data.completion_field", data_key, where)
    columns = _check_template(section.template, rows, data_key, where)
    _check_values(rows, [section.completion_field, *columns], data_key, where)


def encode_sft(rows, data_key, where, section, tokenizer):
    sft_columns(rows, data_key, where, section)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(batch):
        prompts = tokenizer(_fill(section.template, batch))["input_ids"]
        completions = tokenizer([str(c) for c in batch[section.completion_field]],
                                add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "truncated": []}
        for prompt, completion in zip(prompts, completions):
            if len(prompt) >= section.max_length:
                continue  # nothing of the completion would be left to score
            out["input_ids"].append((prompt + completion + eos)[: section.max_length])
            out["labels"].append(([-100] * len(prompt) + completion + eos)[: section.max_length])
            out["truncated"].append(len(prompt) + len(completion) + len(eos) > section.max_length)
        return out

    encoded = rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {data_key}")
    if len(encoded) < len(rows):
        logger.warning("%s: dropped %d of %d rows of %s whose prompt fills data.max_length=%d",
                       data_key, len(rows) - len(encoded), len(rows), where, section.max_length)
    if len(encoded) == 0:
        raise UserError(f"data.max_length: every prompt in {where} ({data_key}) is at least {section.max_length} "
                        "tokens, leaving no completion to train on")
    return _warn_truncated(encoded, data_key, where, section.max_length, "their completions are cut at the end")


def _lm_columns(rows, data_key, where, section) -> None:
    _check_values(rows, _check_template(section.template, rows, data_key, where), data_key, where)


def _encode_lm(rows, data_key, where, section, tokenizer):
    _lm_columns(rows, data_key, where, section)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(batch):
        texts = tokenizer(_fill(section.template, batch), add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + eos for ids in texts]}

    tokens = rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {data_key}")
    stream = pc.list_flatten(tokens.with_format("arrow")["input_ids"])
    size = section.block_size
    num_blocks = len(stream) // size
    if num_blocks == 0:
        raise UserError(f"data.block_size: {where} ({data_key}) has {len(stream)} tokens, fewer than one block "
                        f"of {size}")
    if len(stream) % size:
        logger.info("%s: the last %d tokens of %s (less than one block of %d) are not used",
                    data_key, len(stream) % size, where, size)
    values = stream.slice(0, num_blocks * size).combine_chunks().cast(pa.int64())
    blocks = pa.FixedSizeListArray.from_arrays(values, size)
    return datasets.Dataset(pa.table({"input_ids": blocks, "labels": blocks}))


# ---------------------------------------------------------------- entry point


def load_task_rows(section: DataSection) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The rows of data.train and data.eval (None without data.eval)."""
    train_rows = load_rows(section.train, "data.train")
    eval_rows = load_rows(section.eval, "data.eval") if section.eval is not None else None
    return train_rows, eval_rows


def build_task_data(section: DataSection, tokenizer, model, *, seed: int, batch_size: int,
                    num_rows_needed: int | None = None) -> TaskData:
    """Load, tokenize and arrange the data of `section` for `transformers.Trainer`.

    `batch_size` is the per-device train batch size; `num_rows_needed` (max_steps x batch x
    gradient accumulation) is how many rows a balanced arrangement must cover.
    """
    train_rows, eval_rows = load_task_rows(section)
    classes = check_rows(section, train_rows, eval_rows, encoder=is_sequence_classifier(model), batch_size=batch_size)
    if section.task == "classification":
        return _classification(section, tokenizer, model, train_rows, eval_rows, classes, seed=seed,
                               batch_size=batch_size, num_rows_needed=num_rows_needed)

    encode = encode_sft if section.task == "sft" else _encode_lm
    train = encode(train_rows, "data.train", describe(section.train), section, tokenizer)
    evaluation = None
    if eval_rows is not None:
        evaluation = encode(eval_rows, "data.eval", describe(section.eval), section, tokenizer)
    return TaskData(train, evaluation, RightPadCollator(pad_token_id(tokenizer)), None, None, None, False, "loss")
