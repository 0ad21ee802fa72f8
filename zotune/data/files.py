"""Data files and sources: where a source's rows come from, and local text files checked before they are read.

Files are read with `datasets`, whose caches go to `datasets.config.HF_DATASETS_CACHE`, never next
to the data files.

Local text files (.jsonl, .json, .csv, .txt) are checked first, in one streaming pass: they must be
UTF-8 (a UTF-8 BOM is allowed; UTF-16, Latin-1 and other encodings are refused at the first bad line),
and a .jsonl file must hold one JSON object per line (blank lines are skipped), without duplicate keys,
each column of one JSON type. The line of each JSONL row is kept, so that an error about a row
(`row_location`) names its line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets

from zotune.errors import UserError
from zotune.paths import expand_path, path_kind
from zotune.schema import DataSection, DataSource

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
# the file line of each row of the JSONL files read, by the name errors give them (`describe`)
_ROW_LINES: dict[str, list[int]] = {}


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


def row_location(where: str, row: int) -> str:
    """`where` and row (0-based), with the file's line when it is a JSONL file."""
    lines = _ROW_LINES.get(where)
    return f"{where} row {row} (line {lines[row]})" if lines is not None and row < len(lines) else f"{where} row {row}"


def load_task_rows(section: DataSection) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The rows of data.train and data.eval (None without data.eval)."""
    train_rows = load_rows(section.train, "data.train")
    eval_rows = load_rows(section.eval, "data.eval") if section.eval is not None else None
    return train_rows, eval_rows
