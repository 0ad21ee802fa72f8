"""The first-order part of rule `addax`: which rows get backprop, and what its update adds.

The references are independent: the loss and gradient of the chosen rows taken whole (uncut)
by a plain autograd pass, and θ recomputed from them.
"""

import pytest
import torch
from conftest import tiny_causal_lm
from datasets import Dataset
from helpers import make_trainer

from zotune.errors import UserError
from zotune.first_order import load_gradients, split_rows
from zotune.trajectory import read_trajectory

LENGTHS = [9, 3, 12, 5, 4, 12, 7, 6]  # right-padded to 12


def ragged_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (len(LENGTHS), 12), generator=g)
    mask = (torch.arange(12) < torch.tensor(LENGTHS)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("budget, rows", [(2, []), (3, [1]), (8, [1, 4]), (15, [1, 3, 4]), (24, [1, 3, 4, 7]),
                                          (1000, [0, 1, 2, 3, 4, 6, 7])])
def test_the_shortest_rows_that_fit_the_budget_get_backprop(budget, rows):
    batch = ragged_batch()
    part, rest, tokens = split_rows(batch, budget)
    chosen = rows or None
    if chosen is None:
        assert part is None and rest is batch and tokens == 0
        return
    cut = max(LENGTHS[i] for i in rows)
    assert tokens == len(rows) * cut <= budget
    assert torch.equal(part["input_ids"], batch["input_ids"][rows, :cut])
    others = [i for i in range(len(LENGTHS)) if i not in rows]
    assert torch.equal(rest["labels"], batch["labels"][others])  # one row at least stays ZO, uncut


def test_cutting_the_padding_leaves_the_loss_as_it_was():
    model = tiny_causal_lm("llama")
    batch = ragged_batch()
    part, _, _ = split_rows(batch, 24)
    rows = [1, 3, 4, 7]
    whole = {k: v[rows] for k, v in batch.items()}
    torch.testing.assert_close(model(**part).loss, model(**whole).loss, rtol=1e-6, atol=1e-6)


def test_a_label_past_the_mask_keeps_its_column():
    batch = ragged_batch()
    batch["labels"][1, 10] = 7  # row 1 attends to 3 tokens but is scored at column 10
    assert split_rows(batch, 3)[0] is None  # it needs 11 columns now
    part, rest, _ = split_rows(batch, 10)  # rows 4 and 3 (4 and 5 tokens) come first
    assert part["input_ids"].shape == (2, 5) and rest["labels"][1, 10] == 7


@pytest.mark.parametrize("accumulation, rows", [(1, [1, 3, 4, 7]), (2, [1, 3, 4, 6, 7])])
def test_an_addax_step_adds_the_backprop_gradient_of_the_chosen_rows(accumulation, rows, tmp_path):
    """α = 0: the step is plain SGD on the loss of the rows chosen in each micro-batch, taken as one
    batch (the micro-batches weighted by their tokens); its saved g¹ is that gradient."""
    batch = ragged_batch()
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    model = tiny_causal_lm("llama")
    trainer = make_trainer(model, tmp_path, train=data, max_steps=1, learning_rate=0.5, zo_eps=1e-2,
                           per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                           zo_rule="addax", zo_rule_kwargs={"alpha": 0.0, "max_tokens": 24}, zo_include=["lm_head"])
    reference = tiny_causal_lm("llama")
    reference(**{k: v[rows] for k, v in batch.items()}).loss.backward()
    expected = reference.lm_head.weight.detach() - 0.5 * reference.lm_head.weight.grad
    trainer.train()
    torch.testing.assert_close(model.lm_head.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    [record] = read_trajectory(tmp_path / "zo_trajectory.jsonl")[1]
    saved = load_gradients(tmp_path, record)
    torch.testing.assert_close(saved["lm_head.weight"], reference.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_replay_refuses_a_missing_or_altered_gradient(tmp_path):
    data = Dataset.from_dict({k: v.tolist() for k, v in ragged_batch().items()})
    trainer = make_trainer(tiny_causal_lm("llama"), tmp_path, train=data, max_steps=1, zo_rule="addax",
                           zo_rule_kwargs={"max_tokens": 24}, zo_include=["lm_head"])
    trainer.train()
    [record] = read_trajectory(tmp_path / "zo_trajectory.jsonl")[1]
    path = tmp_path / "zo_first_order" / "step-00000000.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="differs from the gradient step 0 recorded"):
        load_gradients(tmp_path, record)
    path.unlink()
    with pytest.raises(UserError, match="step-00000000.safetensors: missing; step 0 added a first-order gradient"):
        load_gradients(tmp_path, record)


@pytest.mark.parametrize("overrides, message", [
    ({"zo_objective": "accuracy"}, "rule 'addax' .* needs `zo_objective: loss` and `zo_offload: none`"),
    ({"zo_offload": "cpu"}, "rule 'addax' .* needs `zo_objective: loss` and `zo_offload: none`"),
])
def test_addax_refuses_what_would_take_its_gradient_elsewhere_than_at_theta(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny_causal_lm("llama"), tmp_path, zo_rule="addax", **overrides)


def test_a_left_padded_batch_with_positions_is_cut_from_the_left():
    """zotune's classification batches: left padding, explicit position_ids, one label per row."""
    batch = ragged_batch()
    mask = batch["attention_mask"].flip(1)
    left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "labels": torch.arange(len(LENGTHS))}
    part, rest, tokens = split_rows(left, 15)
    assert tokens == 15 and part["input_ids"].shape == (3, 5) and part["labels"].tolist() == [1, 3, 4]
    model = tiny_causal_lm("llama")
    keys = ("input_ids", "attention_mask", "position_ids")
    whole = {k: left[k][[1, 3, 4]] for k in keys}
    torch.testing.assert_close(model(**{k: part[k] for k in keys}).logits[:, -1],
                               model(**whole).logits[:, -1], rtol=1e-5, atol=1e-5)
    del left["position_ids"]  # then the leading padding counts as positions: nothing is cut
    assert split_rows(left, 11)[0] is None and split_rows(left, 24)[0]["input_ids"].shape == (2, 12)
