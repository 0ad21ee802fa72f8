"""zotune.data: loading, the three tasks' tokenization, collators, losses and balanced batches."""

import copy
import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_causal_lm
from transformers import EvalPrediction

from helpers import DATA as SHARED

from zotune.data import build_task_data, load_rows, tasks
from zotune.errors import UserError
from zotune.models import forward_accepts
from zotune.schema import DataSection, DataSource

ROWS = [
    {"text": "a fine film", "label": 1},
    {"text": "dull, \"long\", and slow", "label": 0},
    {"text": "loved it", "label": 1},
    {"text": "no", "label": 0},
    {"text": "a, b; c", "label": 1},
]
VERBALIZER = {"0": "n", "1": "y"}  # one byte each, so one token each for the byte tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from zotune.models import byte_tokenizer

    return byte_tokenizer()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classification(train, *, eval=None, **fields) -> DataSection:
    fields.setdefault("verbalizer", VERBALIZER)
    return DataSection(task="classification", train=DataSource(path=str(train)),
                       eval=None if eval is None else DataSource(path=str(eval)), **fields)


def user_error(match_all, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- loading


def test_local_formats_give_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("".join(r["text"] + "\n" for r in ROWS))

    for suffix in ("jsonl", "json", "csv", "parquet"):
        rows = load_rows(DataSource(path=str(tmp_path / f"d.{suffix}")), "data.train")
        assert rows.to_list() == ROWS, suffix
    lines = load_rows(DataSource(path=str(tmp_path / "d.txt")), "data.train")
    assert lines.column_names == ["text"]
    assert lines["text"] == [r["text"] for r in ROWS]


def test_max_samples_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_rows(DataSource(path=str(path), max_samples=2), "data.train").to_list() == ROWS[:2]
    assert len(load_rows(DataSource(path=str(path), max_samples=99), "data.train")) == len(ROWS)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
def test_reads_the_shared_jsonl_files():
    path = SHARED / "rotten_tomatoes" / "validation.jsonl"
    rows = load_rows(DataSource(path=str(path)), "data.eval")
    first = json.loads(path.read_text().splitlines()[0])
    assert len(rows) == 1000 and rows.column_names == ["text", "label"] and rows[0] == first
    assert set(rows["label"]) == {0, 1}

    path = SHARED / "bbc_news" / "train.jsonl"
    rows = load_rows(DataSource(path=str(path), max_samples=7), "data.train")
    expected = [json.loads(line) for line in path.read_text().splitlines()[:7]]
    assert rows.to_list() == expected
    assert set(rows.column_names) == {"title", "text", "label"} and isinstance(rows[0]["label"], str)


def test_missing_file_names_the_key_and_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    user_error(["data.train.path", "file not found", str(missing)], load_rows, DataSource(path=str(missing)),
               "data.train")
    user_error(["data.eval.path", "./not/here"], load_rows, DataSource(path="./not/here"), "data.eval")


def test_hub_name_and_fallback_go_to_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = DataSource(path=str(tmp_path / "absent.jsonl"), fallback="cornell-movie-review-data/rotten_tomatoes",
                        split="validation", max_samples=3)
    assert load_rows(source, "data.eval").to_list() == ROWS[:3]
    assert calls == [("cornell-movie-review-data/rotten_tomatoes", None, "validation")]

    calls.clear()
    load_rows(DataSource(path="glue", name="sst2", split="train"), "data.train")
    assert calls == [("glue", "sst2", "train")]


def test_unreachable_hub_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some/dataset' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    user_error(["data.train.path", "some/dataset", "OfflineModeIsEnabled"], load_rows,
               DataSource(path="some/dataset"), "data.train")


@pytest.mark.parametrize("content", ["", "text,label\n"], ids=["empty", "header-only"])
def test_empty_file_names_the_file(tmp_path, content):
    suffix = "csv" if content else "jsonl"
    path = tmp_path / f"empty.{suffix}"
    path.write_text(content)
    user_error(["data.train", str(path)], load_rows, DataSource(path=str(path)), "data.train")


# ---------------------------------------------------------------- user errors while building


def test_missing_label_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "stars": 1}])
    user_error(["data.train", str(path), "column 'label' not found", "text, stars", "data.label_field"],
               build_task_data, classification(path), tokenizer, None, seed=0, batch_size=2)


def test_unknown_label_names_file_row_and_value(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "eval.jsonl", ROWS[:3] + [{"text": "meh", "label": 2}])
    user_error(["data.verbalizer", "label '2'", str(bad), "row 3", "known: 0, 1"],
               build_task_data, classification(train, eval=bad), tokenizer, None, seed=0, batch_size=2)


def test_multi_token_label_word(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    section = classification(train, verbalizer={"0": " terrible", "1": " great"})
    user_error(["data.verbalizer", "' terrible'", "exactly one token"],
               build_task_data, section, tokenizer, None, seed=0, batch_size=2)


def test_template_naming_a_missing_column(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    section = classification(train, template="{review} It was")
    user_error(["data.template", "'review'", str(train), "text, label"],
               build_task_data, section, tokenizer, None, seed=0, batch_size=2)


def test_balanced_needs_a_batch_divisible_by_the_classes(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    user_error(["train.per_device_train_batch_size", "data.balanced", str(train)],
               build_task_data, classification(train, balanced=True), tokenizer, None, seed=0, batch_size=3)


# ---------------------------------------------------------------- classification with a causal LM


def test_tokenized_rows_are_cached_under_what_they_depend_on(tmp_path, tokenizer):
    """zotune fingerprints its tokenizing maps itself (datasets' own pickles the tokenizer: 20 s per split
    for Gemma 3's vocabulary): the same inputs find datasets' cached result; another template, another
    tokenizer or other data do not, and each gives its own rows."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    model = tiny_causal_lm("llama")

    def encoded(tok, path=train, **fields):
        return build_task_data(classification(path, **fields), tok, model, seed=0, batch_size=2).train_dataset

    first, again = encoded(tokenizer), encoded(tokenizer)
    assert first._fingerprint == again._fingerprint and first.cache_files == again.cache_files
    assert first["input_ids"] == again["input_ids"]
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["fine"])
    rows = ROWS[:4] + [{"text": "dull", "label": 0}]
    changed = {"template": encoded(tokenizer, template="{text}!"), "tokenizer": encoded(other),
               "data": encoded(tokenizer, write_jsonl(tmp_path / "other.jsonl", rows))}
    for what, dataset in changed.items():
        assert dataset._fingerprint != first._fingerprint, what
        assert dataset["input_ids"] != first["input_ids"], what


def test_classification_collator_pads_left(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    model = tiny_causal_lm("llama")
    task = build_task_data(classification(train, template="{text}:"), tokenizer, model, seed=0, batch_size=2)
    assert task.metric == "accuracy" and task.sequential_sampling is False
    features = [task.train_dataset[i] for i in range(3)]
    batch = task.data_collator(features)

    texts = [r["text"] + ":" for r in ROWS[:3]]
    width = max(len(t.encode()) for t in texts)
    for row, text in enumerate(texts):
        ids = list(text.encode())
        pad = width - len(ids)
        assert batch["input_ids"][row].tolist() == [tokenizer.pad_token_id] * pad + ids
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
        assert batch["position_ids"][row].tolist() == [0] * pad + list(range(len(ids)))
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]
    assert batch["logits_to_keep"] == 1


def test_left_truncation_keeps_the_end_and_a_leading_bos():
    assert tasks._keep_end([9, 1, 2, 3, 4], 3, bos_id=9) == [9, 3, 4]
    assert tasks._keep_end([1, 2, 3, 4], 3, bos_id=9) == [2, 3, 4]
    assert tasks._keep_end([9, 1], 3, bos_id=9) == [9, 1]


def test_long_prompts_are_cut_from_the_left(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    task = build_task_data(classification(train, template="{text} It was", max_length=8), tokenizer,
                           tiny_causal_lm("llama"), seed=0, batch_size=2)
    assert task.train_dataset[0]["input_ids"] == list(b"m It was")
    assert task.train_dataset[3]["input_ids"] == list(b"no It was")[-8:]


def test_forward_signature_decides_logits_to_keep_and_position_ids():
    class NoExtras(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            pass

    assert not forward_accepts(NoExtras(), "logits_to_keep")
    assert forward_accepts(tiny_causal_lm("gpt2"), "logits_to_keep")
    assert forward_accepts(tiny_causal_lm("opt"), "position_ids")


def test_loss_is_cross_entropy_over_the_label_words(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    model = tiny_causal_lm("llama").eval()
    task = build_task_data(classification(train, template="{text} =", verbalizer={"0": "-", "1": "+"}),
                           tokenizer, model, seed=0, batch_size=4)
    batch = task.data_collator([task.train_dataset[i] for i in range(len(ROWS))])
    labels = batch.pop("labels")
    with torch.no_grad():
        kept = model(**batch)
        full = model(**{k: v for k, v in batch.items() if k != "logits_to_keep"})
    assert kept.logits.shape[1] == 1 and full.logits.shape[1] == batch["input_ids"].shape[1]

    word_ids = [ord("-"), ord("+")]
    log_probs = full.logits[:, -1, word_ids].log_softmax(-1)
    manual = -log_probs[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(task.compute_loss_func(kept, labels), manual)
    torch.testing.assert_close(task.compute_loss_func(full, labels, num_items_in_batch=4), manual)

    scores = task.preprocess_logits_for_metrics(kept.logits, labels)
    torch.testing.assert_close(scores, full.logits[:, -1, word_ids])
    predicted = scores.argmax(-1)
    metrics = task.compute_metrics(EvalPrediction(predictions=scores.numpy(), label_ids=labels.numpy()))
    assert metrics == {"accuracy": pytest.approx((predicted == labels).float().mean().item())}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "qwen2", "gemma3_text"])
def test_left_padding_scores_like_the_unpadded_prompt(tmp_path, tokenizer, arch):
    rows = [{"text": "x" * n + " fine", "label": n % 2} for n in (1, 9, 23)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    model = tiny_causal_lm(arch).eval()
    task = build_task_data(classification(train), tokenizer, model, seed=0, batch_size=2)
    features = [task.train_dataset[i] for i in range(len(rows))]
    batch = task.data_collator(features)
    batch.pop("labels")
    word_ids = [ord("n"), ord("y")]
    with torch.no_grad():
        padded = model(**batch).logits[:, -1, word_ids]
        for row, f in enumerate(features):
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, -1, word_ids]
            torch.testing.assert_close(padded[row], alone, atol=1e-5, rtol=1e-4)
        if arch == "gpt2":  # the check can fail: absolute positions need position_ids under left padding
            batch.pop("position_ids")
            shifted = model(**batch).logits[:, -1, word_ids]
            assert not torch.allclose(shifted[0], padded[0], atol=1e-4)


def test_trainer_evaluate_uses_loss_and_metrics(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    model = tiny_causal_lm("gpt2").eval()
    task = build_task_data(classification(train, eval=train, template="{text}."), tokenizer, model, seed=0,
                           batch_size=2)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                                          per_device_eval_batch_size=2, use_cpu=True),
                      eval_dataset=task.eval_dataset, data_collator=task.data_collator,
                      compute_loss_func=task.compute_loss_func, compute_metrics=task.compute_metrics,
                      preprocess_logits_for_metrics=task.preprocess_logits_for_metrics)
    metrics = trainer.evaluate()

    batch = task.data_collator([task.eval_dataset[i] for i in range(len(ROWS))])
    labels = batch.pop("labels")
    batch.pop("logits_to_keep")
    with torch.no_grad():
        scores = model(**batch).logits[:, -1, [ord("n"), ord("y")]]
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(scores, labels).item(), rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx((scores.argmax(-1) == labels).float().mean().item())


# ---------------------------------------------------------------- sft and lm


def test_sft_masks_the_prompt_exactly(tmp_path, tokenizer):
    rows = [{"q": "2+2", "completion": "4"}, {"q": "capital of France", "completion": "Paris"},
            {"q": "a very long question that fills the window", "completion": "x"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    section = DataSection(task="sft", train=DataSource(path=str(train)), eval=DataSource(path=str(train)),
                          template="Q: {q}\nA:", max_length=24)
    task = build_task_data(section, tokenizer, None, seed=0, batch_size=2)
    assert task.metric == "loss" and task.compute_loss_func is None and task.compute_metrics is None
    assert len(task.train_dataset) == 2  # the third prompt is longer than max_length
    eos = tokenizer.eos_token_id
    for example, row in zip(task.train_dataset, rows):
        prompt, completion = list(f"Q: {row['q']}\nA:".encode()), list(row["completion"].encode())
        expected = (prompt + completion + [eos])[:24]
        assert example["input_ids"] == expected
        assert example["labels"] == ([-100] * len(prompt) + completion + [eos])[:24]
    assert task.train_dataset[1]["input_ids"][-1] != eos  # truncated inside the completion

    batch = task.data_collator(list(task.train_dataset))
    n = len(task.train_dataset[0]["input_ids"])
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, n:].eq(-100).all() and batch["attention_mask"][0].tolist() == [1] * n + [0] * (24 - n)


def test_sft_template_error_names_the_file(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "a"}])
    section = DataSection(task="sft", train=DataSource(path=str(train)), template="{prompt}")
    user_error(["data.completion_field", str(train), "'completion'", "prompt, answer"],
               build_task_data, section, tokenizer, None, seed=0, batch_size=2)


def test_lm_blocks_pack_the_token_stream(tmp_path, tokenizer):
    text = tmp_path / "book.txt"
    lines = ["It is a truth universally acknowledged,", "", "that a single man in possession", "of a good fortune."]
    text.write_text("\n".join(lines) + "\n")
    section = DataSection(task="lm", train=DataSource(path=str(text)), block_size=16)
    task = build_task_data(section, tokenizer, None, seed=0, batch_size=2)

    stream = [t for line in lines for t in list(line.encode()) + [tokenizer.eos_token_id]]
    blocks = task.train_dataset["input_ids"]
    assert len(blocks) == len(stream) // 16 and all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 16]
    assert task.train_dataset["labels"] == blocks
    batch = task.data_collator([task.train_dataset[0], task.train_dataset[1]])
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])

    short = DataSection(task="lm", train=DataSource(path=str(text)), block_size=1000)
    user_error(["data.block_size", str(text)], build_task_data, short, tokenizer, None, seed=0, batch_size=2)


# ---------------------------------------------------------------- balanced batches


def imbalanced_rows():
    counts = {"a": 30, "b": 12, "c": 6}
    return [{"text": f"{label}{i}", "label": label} for label, n in counts.items() for i in range(n)]


def test_balanced_batches_hold_equal_class_counts(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", imbalanced_rows())
    section = classification(train, verbalizer={"a": "a", "b": "b", "c": "c"}, balanced=True)
    model = tiny_causal_lm("llama")

    def arranged(seed, needed=60):
        task = build_task_data(section, tokenizer, model, seed=seed, batch_size=6, num_rows_needed=needed)
        assert task.sequential_sampling
        return task.train_dataset

    first = arranged(seed=1)
    labels = np.asarray(first["labels"]).reshape(-1, 6)
    assert labels.shape == (10, 6)
    assert all(np.bincount(batch, minlength=3).tolist() == [2, 2, 2] for batch in labels)
    assert len(set(map(tuple, labels))) > 1  # shuffled within the batches

    assert first["input_ids"] == arranged(seed=1)["input_ids"]
    assert first["input_ids"] != arranged(seed=2)["input_ids"]
    assert len(arranged(seed=1, needed=61)) == 66
    assert len(arranged(seed=1, needed=None)) == 18  # one pass over the 6 rows of "c", 3 classes


def test_balanced_draws_each_class_without_replacement():
    labels = np.repeat([0, 1], [10, 3])
    order = tasks._balanced_order(labels, 2, batch_size=4, num_rows=40, seed=0)
    uses = np.bincount(order, minlength=13)
    assert (uses[:10] == 2).all()  # 20 draws of class 0: two full passes
    assert sorted(uses[10:]) == [6, 7, 7]  # 20 draws of 3 rows: six passes, then two rows of the seventh


# ---------------------------------------------------------------- sequence classification (BERT)


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("bert", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, pad_token_id=258)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_sequence_classifier_uses_its_own_head(tmp_path, tokenizer, tiny_bert):
    rows = [{"text": "good" * (i + 1), "label": ["pos", "neg"][i % 2]} for i in range(5)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    section = DataSection(task="classification", train=DataSource(path=str(train)), max_length=12)
    task = build_task_data(section, tokenizer, tiny_bert, seed=0, batch_size=2)
    assert task.compute_loss_func is None and task.preprocess_logits_for_metrics is None
    assert task.metric == "accuracy"
    assert task.train_dataset["labels"] == [1, 0, 1, 0, 1]  # sorted labels: neg, pos
    assert task.train_dataset[4]["input_ids"] == list(b"goodgoodgood")  # truncated on the right

    features = list(task.train_dataset)
    batch = task.data_collator(features)
    assert batch["input_ids"][0].tolist() == list(b"good") + [tokenizer.pad_token_id] * 8
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 8
    assert batch["labels"].tolist() == [1, 0, 1, 0, 1]
    with torch.no_grad():
        out = tiny_bert(**batch)
        alone = tiny_bert(input_ids=torch.tensor([features[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(out.logits[0], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, batch["labels"]))
    metrics = task.compute_metrics(EvalPrediction(predictions=out.logits.numpy(), label_ids=batch["labels"].numpy()))
    assert metrics["accuracy"] == pytest.approx((out.logits.argmax(-1) == batch["labels"]).float().mean().item())


def test_sequence_classifier_label_count_must_match_the_head(tmp_path, tokenizer, tiny_bert):
    rows = [{"text": "t", "label": k} for k in ("x", "y", "z")]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    section = DataSection(task="classification", train=DataSource(path=str(train)))
    user_error(["data.verbalizer", str(train), "num_labels"], build_task_data, section, tokenizer, tiny_bert,
               seed=0, batch_size=2)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "t", "label": "x"}, {"text": "u", "label": "w"}])
    section = DataSection(task="classification", train=DataSource(path=str(train), max_samples=2),
                          eval=DataSource(path=str(evaluation)))
    user_error(["data.label_field", "'w'", str(evaluation), "row 1", "known: x, y"], build_task_data, section,
               tokenizer, tiny_bert, seed=0, batch_size=2)
