"""The four tasks: rows to tokenized examples, and their losses and metrics, for `transformers.Trainer`.

- classification: a prompt scored on one label word per class (MeZO-style) for causal LMs, or the
  model's own head for `...ForSequenceClassification` models;
- sft: prompt + completion, loss on the completion only;
- lm: texts packed into fixed-size blocks;
- reward: prompts (the filled template, column `prompt`) with their rows' other columns, which the
  reward functions read; tokenized per batch by `zotune.reward.trainer`.

A row without a value (missing or null) for a column the task reads is an error naming its line.
Nothing is dropped silently: examples longer than `data.max_length` are truncated with a warning
that counts them (classification keeps the end of the prompt, where the label is scored; sft keeps
the start and drops rows whose prompt alone fills the context), and lm packing warns about the tail
shorter than one block.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from zotune.data.collate import INDEX, PROMPT, LeftPadCollator, RightPadCollator, pad_token_id
from zotune.data.files import describe, load_task_rows, row_location
from zotune.errors import UserError
from zotune.models import forward_accepts
from zotune.schema import DataSection

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- checks shared by the tasks


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
                f"{data_key}: {row_location(where, first)}: no value for {column!r} "
                f"(missing or null; {values.null_count} of {len(rows)} rows); fill it in or remove those rows"
            )


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


# ---------------------------------------------------------------- losses and metrics


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
            raise UserError(f"{key}: label {str(value)!r} in {row_location(where, row)} "
                            f"(column {section.label_field!r}) {what} (known: {', '.join(classes)})")
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


def _tokenized(rows: datasets.Dataset, encode: Callable, tokenizer, data_key: str, depends_on: tuple,
               **map_kwargs) -> datasets.Dataset:
    """`rows.map(encode, batched=True, ...)`, cached by datasets under a fingerprint of what the result
    depends on: the rows' own fingerprint, zotune's version and this module's code (`encode` and the
    helpers it calls), the tokenizer's whole serialization and `depends_on` (the data section, the
    labels). datasets' own fingerprint pickles `encode` with the tokenizer it holds: about 20 s per
    split for Gemma 3's 262k-token vocabulary, on every run. A tokenizer without a fast backend gets
    datasets' own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fingerprint = None
    if backend is not None:
        import zotune

        digest = hashlib.sha256()
        for part in (rows._fingerprint, zotune.__version__, Path(__file__).read_bytes(), encode.__qualname__,
                     type(tokenizer).__name__, backend.to_str(), *map(repr, depends_on)):
            digest.update(part if isinstance(part, bytes) else str(part).encode())
            digest.update(b"\0")
        fingerprint = digest.hexdigest()[:16]
    return rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {data_key}",
                    new_fingerprint=fingerprint, **map_kwargs)


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
                "truncated": [len(ids) > section.max_length for ids in full], INDEX: list(indices)}

    encoded = _tokenized(rows, encode, tokenizer, data_key, (section, classes, labels, encoder), with_indices=True)
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
    check = {"sft": sft_columns, "reward": reward_columns}.get(section.task, _lm_columns)
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


# ---------------------------------------------------------------- reward


def reward_columns(rows, data_key, where, section) -> None:
    """The template's columns exist and have a value in every row, and no column is called `prompt`."""
    if PROMPT in rows.column_names:
        raise UserError(f"{data_key}: {where} has a column {PROMPT!r}, which data.task reward writes (the filled "
                        f"data.template); rename it and name it in the template, e.g. '{{{PROMPT}_text}}'")
    _check_values(rows, _check_template(section.template, rows, data_key, where), data_key, where)


def prompt_rows(rows: datasets.Dataset, data_key: str, where: str, section) -> datasets.Dataset:
    """The rows with their filled template as `prompt`; the other columns go to the reward functions."""
    reward_columns(rows, data_key, where, section)
    return rows.add_column(PROMPT, _fill(section.template, rows.to_dict()))


# ---------------------------------------------------------------- sft and lm


def sft_columns(rows, data_key, where, section) -> None:
    """The completion column and the template's columns exist and have a value in every row."""
    require_column(rows, section.completion_field, "data.completion_field", data_key, where)
    columns = _check_template(section.template, rows, data_key, where)
    _check_values(rows, [section.completion_field, *columns], data_key, where)


def encode_sft(rows, data_key, where, section, tokenizer):
    sft_columns(rows, data_key, where, section)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(batch, indices):
        prompts = tokenizer(_fill(section.template, batch))["input_ids"]
        completions = tokenizer([str(c) for c in batch[section.completion_field]],
                                add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "truncated": [], INDEX: []}
        for prompt, completion, index in zip(prompts, completions, indices):
            if len(prompt) >= section.max_length:
                continue  # nothing of the completion would be left to score
            out["input_ids"].append((prompt + completion + eos)[: section.max_length])
            out["labels"].append(([-100] * len(prompt) + completion + eos)[: section.max_length])
            out["truncated"].append(len(prompt) + len(completion) + len(eos) > section.max_length)
            out[INDEX].append(index)
        return out

    encoded = _tokenized(rows, encode, tokenizer, data_key, (section,), with_indices=True)
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

    tokens = _tokenized(rows, encode, tokenizer, data_key, (section,))
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
    return datasets.Dataset(pa.table({"input_ids": blocks, "labels": blocks, INDEX: pa.array(range(num_blocks))}))


# ---------------------------------------------------------------- entry point


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

    if section.task == "reward":  # tokenized per batch by the trainer (zotune.reward.trainer.PromptCollator)
        train = prompt_rows(train_rows, "data.train", describe(section.train), section)
        evaluation = None if eval_rows is None else prompt_rows(eval_rows, "data.eval", describe(section.eval), section)
        return TaskData(train, evaluation, None, None, None, None, False, "mean_reward")
    encode = encode_sft if section.task == "sft" else _encode_lm
    train = encode(train_rows, "data.train", describe(section.train), section, tokenizer)
    evaluation = None
    if eval_rows is not None:
        evaluation = encode(eval_rows, "data.eval", describe(section.eval), section, tokenizer)
    return TaskData(train, evaluation, RightPadCollator(pad_token_id(tokenizer)), None, None, None, False, "loss")
