"""Broken data files: each is a clean `UserError` naming the file (and the line), or a documented,
warned handling; never a crash, a hang or rows silently lost.

The JSONL fuzzer writes random rows, damages the file (cuts it at a random byte, re-encodes it,
drops or nulls a field, changes a type, adds blank lines), then compares the loader against an
independent reading of the same bytes with the standard library: a file that reads cleanly must
give exactly its rows, in order; a broken one must be an error that names the file and a line
that really is broken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

import datasets
import pytest
from conftest import no_hang as conftest_no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zotune.data import build_task_data, load_rows
from zotune.errors import UserError
from zotune.schema import DataSection, DataSource

# derandomize: CI runs the same examples every time (a new failure is found by raising max_examples locally)
FUZZ = settings(max_examples=40, deadline=timedelta(seconds=10), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VERBALIZER = {"0": "n", "1": "y"}
datasets.disable_progress_bars()  # 40 examples a property: one bar each would bury the report


@pytest.fixture(scope="module")
def tokenizer():
    from zotune.models import byte_tokenizer

    return byte_tokenizer()  # one id per UTF-8 byte, no BOS: a prompt's length is its byte count


def no_hang(seconds: int = 30):
    return conftest_no_hang(seconds, "data loading")


MODEL = []


def build(section, tokenizer):
    if not MODEL:
        from conftest import tiny_causal_lm

        MODEL.append(tiny_causal_lm("llama"))
    with no_hang():
        try:
            return build_task_data(section, tokenizer, MODEL[0], seed=0, batch_size=2)
        except UserError as e:
            return e


# ---------------------------------------------------------------- an independent reading of a JSONL file


def unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key given twice")
    return dict(pairs)


def reference(data: bytes) -> tuple[list[dict] | None, set[int]]:
    """(rows, bad lines) by the standard library: rows is None when any line is bad.

    A good file: UTF-8 (BOM allowed), no NUL, each non-blank line a JSON object with a string
    `text` and an integer `label` of the verbalizer; blank lines carry no row."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None, {1}
    rows, bad = [], set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            continue
        text = text.removeprefix("\ufeff") if number == 1 else text
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=unique_keys) if "\x00" not in text else None
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the decoder's stack
            row = None
        if (not isinstance(row, dict) or not isinstance(row.get("text"), str) or type(row.get("label")) is not int
                or str(row["label"]) not in VERBALIZER):
            bad.add(number)
        else:
            rows.append(row)
    if not rows and not bad:
        return None, set()
    return (None if bad else rows), bad


rows_strategy = st.lists(st.fixed_dictionaries({
    "text": st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
    "label": st.sampled_from([0, 1]),
}), min_size=1, max_size=8)


@st.composite
def damaged(draw):
    rows = draw(rows_strategy)
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in rows]
    damage = draw(st.sampled_from(["none", "cut", "latin-1", "utf-16", "utf-8-sig", "blank", "drop", "null",
                                   "type", "array", "garbage", "crlf"]))
    i = draw(st.integers(0, len(lines) - 1))
    if damage == "blank":
        lines.insert(i, draw(st.sampled_from(["", "  ", "\t"])))
    elif damage in ("drop", "null"):
        row = dict(rows[i])
        field = draw(st.sampled_from(["text", "label"]))
        if damage == "drop":
            del row[field]
        else:
            row[field] = None
        lines[i] = json.dumps(row)
    elif damage == "type" and len(lines) > 1:  # the first row sets a column's type: damage a later one
        i = max(i, 1)
        lines[i] = json.dumps({**rows[i], "label": str(rows[i]["label"])})
    elif damage == "array":
        lines[i] = json.dumps(list(rows[i].values()))
    elif damage == "garbage":
        lines[i] = draw(st.sampled_from(["{", "}", "nul\x00l", '{"text": "a" "label": 1}', "[" * 3000, "1" * 5000,
                                         '{"text": "a", "text": "b", "label": 1}']))
    text = ("\r\n" if damage == "crlf" else "\n").join(lines) + "\n"
    data = text.encode("utf-8")
    if damage in ("latin-1", "utf-16", "utf-8-sig"):
        data = text.encode(damage, errors="replace")
    if damage == "cut":
        data = data[: draw(st.integers(1, len(data)))]
    return data


@FUZZ
@given(data=damaged(), max_length=st.sampled_from([4, 16, 256]))
def test_damaged_jsonl_classification(tmp_path_factory, tokenizer, caplog, data, max_length):
    path = tmp_path_factory.mktemp("d") / "train.jsonl"
    path.write_bytes(data)
    section = DataSection(task="classification", train=DataSource(path=str(path)), verbalizer=VERBALIZER,
                          max_length=max_length)
    expected, bad = reference(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune.data"):
        result = build(section, tokenizer)
    if expected is None:
        assert isinstance(result, UserError), f"a broken file was accepted: {data[:200]!r}"
        message = str(result)
        assert str(path) in message
        named = [int(n) for n in __import__("re").findall(rf"{path}:(\d+)|\(line (\d+)\)", message)[0] if n] \
            if __import__("re").search(rf"{path}:(\d+)|\(line (\d+)\)", message) else []
        if bad and named:
            assert named[0] in bad, (message, sorted(bad))
        elif bad:  # no line to name: a column the task reads is missing from every row
            assert "not found" in message and all(n in bad for n in range(1, len(data.splitlines()) + 1)
                                                  if data.splitlines()[n - 1].strip()), (message, sorted(bad))
        return
    # an intact file: every row, in order, its prompt whole or its end kept with a warning
    assert not isinstance(result, UserError), f"{result} for {data[:200]!r}"
    train = result.train_dataset
    assert train["labels"] == [r["label"] for r in expected]
    prompts = [list(r["text"].encode()) for r in expected]
    assert train["input_ids"] == [p[-max_length:] for p in prompts]
    long = sum(len(p) > max_length for p in prompts)
    warned = [r.getMessage() for r in caplog.records if "longer than data.max_length" in r.getMessage()]
    assert (f"{long} of {len(prompts)} examples" in warned[0]) if long else not warned


# ---------------------------------------------------------------- encodings, every text format


ENCODINGS = ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32", "utf-8-sig"]


def write_format(path: Path, rows, encoding: str) -> None:
    suffix = path.suffix
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False)
    elif suffix == ".csv":
        text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    else:
        text = "".join(r["text"] + "\n" for r in rows)
    path.write_bytes(text.encode(encoding))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_wrong_encodings_are_named_and_a_bom_is_dropped(tmp_path, suffix, encoding):
    rows = [{"text": "plain", "label": 0}, {"text": "caf\u00e9 cr\u00e8me", "label": 1}]
    path = tmp_path / f"d{suffix}"
    write_format(path, rows, encoding)
    with no_hang():
        try:
            loaded = load_rows(DataSource(path=str(path)), "data.train")
        except UserError as e:
            loaded = e
    if encoding == "utf-8-sig":  # documented: a UTF-8 BOM is allowed and is not part of the data
        assert not isinstance(loaded, UserError), loaded
        assert loaded["text"] == [r["text"] for r in rows]
        return
    assert isinstance(loaded, UserError), f"{encoding} {suffix} read as {loaded[:]}"
    message = str(loaded)
    assert message.startswith("data.train") and str(path) in message
    # the line named is the first whose bytes are not UTF-8 (or line 1 for a BOM / NULs)
    first_bad = next(i for i, line in enumerate(path.read_bytes().split(b"\n"), 1)
                     if b"\x00" in line or line.startswith((b"\xff\xfe", b"\xfe\xff")) or not _is_utf8(line))
    assert f"{path}:{first_bad}:" in message


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
def test_empty_and_blank_files(tmp_path, suffix):
    for content in (b"", b"\n\n  \n"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(content)
        with no_hang():
            try:
                rows = load_rows(DataSource(path=str(path)), "data.train")
            except UserError as e:
                assert str(path) in str(e)
                continue
        # only a text file of blank lines reads, as the blank texts it holds (nothing lost)
        assert suffix == ".txt" and rows["text"] == [line.decode() for line in content.split(b"\n")[:-1]]


@pytest.mark.parametrize("task, field", [("classification", "label"), ("classification", "text"),
                                         ("sft", "completion"), ("sft", "text"), ("lm", "text")])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_missing_values_name_the_line(tmp_path, tokenizer, task, field, how):
    rows = [{"text": f"row {i}", "label": i % 2, "completion": f" c{i}"} for i in range(5)]
    broken = 3
    if how == "missing":
        del rows[broken][field]
    else:
        rows[broken][field] = None
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line: rows != lines
    section = DataSection(task=task, train=DataSource(path=str(path)), **({"block_size": 4} if task == "lm" else {}),
                          verbalizer=VERBALIZER if task == "classification" else None)
    result = build(section, tokenizer)
    assert isinstance(result, UserError)
    line = path.read_text().splitlines().index(json.dumps(rows[broken])) + 1
    assert str(path) in str(result) and f"line {line}" in str(result) and repr(field) in str(result)


# ---------------------------------------------------------------- longer than the context


@FUZZ
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), max_length=st.integers(2, 24))
def test_sft_long_examples_warn_and_count(tmp_path_factory, tokenizer, caplog, lengths, max_length):
    rows = [{"text": "p" * n, "completion": "c" * (40 - n)} for n in lengths]
    path = tmp_path_factory.mktemp("sft") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(task="sft", train=DataSource(path=str(path)), template="{text}", max_length=max_length)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune.data"):
        result = build(section, tokenizer)
    eos = 1  # the byte tokenizer's EOS ends every completion
    kept = [n for n in lengths if n < max_length]
    if not kept:
        assert isinstance(result, UserError) and "data.max_length" in str(result)
        return
    assert len(result.train_dataset) == len(kept)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    if len(kept) < len(rows):
        assert f"dropped {len(rows) - len(kept)} of {len(rows)} rows" in messages
    cut = sum(n + (40 - n) + eos > max_length for n in kept)
    assert (f"{cut} of {len(kept)} examples" in messages) if cut else "longer than" not in messages
    assert all(len(ids) == min(n + 40 - n + eos, max_length) for ids, n in zip(result.train_dataset["input_ids"], kept))


def test_lm_tail_shorter_than_a_block_is_reported(tmp_path, tokenizer, caplog):
    path = tmp_path / "d.txt"
    path.write_text("abcdefg\n")  # 7 bytes + EOS = 8 tokens
    section = DataSection(task="lm", train=DataSource(path=str(path)), block_size=3)
    with caplog.at_level(logging.INFO, logger="zotune.data"):
        result = build(section, tokenizer)
    assert len(result.train_dataset) == 8 // 3
    assert any("the last 2 tokens" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- special files


def test_special_files_as_data_are_refused_without_reading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.jsonl")
    Path("zero.jsonl").symlink_to("/dev/zero")
    try:
        for path in ["/dev/zero", "/dev/urandom", "fifo.jsonl", "./sock.jsonl", "zero.jsonl"]:
            with no_hang(10):
                with pytest.raises(UserError, match="device, FIFO or socket"):
                    load_rows(DataSource(path=path), "data.train")
    finally:
        sock.close()
