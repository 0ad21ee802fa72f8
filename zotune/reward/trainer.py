"""`ZORewardTrainer`: reward fine-tuning from generated text with forward passes only.

Each step perturbs θ along q seeded directions, generates completions for the batch's prompts with
θ + εz_k and θ − εz_k (under `dual`, the whole population in one batched `generate`:
`zotune.reward.population`), scores them with the reward functions (trl's signature:
`zotune.reward.functions`) and takes L = −mean reward as the objective of the ZO step. With the
`es` rule the projected gradients are divided by the spread of the population's rewards, which is
evolution strategies' update (Salimans et al., 2017, arXiv:1703.03864; Qiu et al., 2025,
arXiv:2509.24372): see docs/methods.md. The trajectory records every member's mean reward (as
`loss_plus`, `loss_minus`: minus the rewards), so replay and resume need no generation.

A train dataset holds a `prompt` column (text, the template already applied) and any columns the
reward functions read.

Under `torchrun` or `accelerate launch` the ranks share out the population, not the prompts: each
rank's batch is gathered into one on every rank, each rank generates for its directions only
(k ≡ rank mod world size) and the ranks exchange the members' mean rewards (a few floats; Salimans et
al. 2017 share them the same way), so a step costs 1/world of one process's and ends where it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from zotune.batch import batch_rows
from zotune.data.collate import PROMPT
from zotune.errors import UserError
from zotune.optim import data_parallel
from zotune.reward.functions import RewardFunctions
from zotune.reward.population import Generation, PopulationRewards, Scorer
from zotune.trainer import ZOTrainer


@dataclass
class PromptCollator:
    """Left-padded prompt tokens, with the rows' text and other columns as lists (the reward functions' inputs)."""

    tokenizer: Any

    def __call__(self, features: Sequence[dict]) -> dict:
        encoded = self.tokenizer([f[PROMPT] for f in features], padding=True, padding_side="left",
                                 return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        for key in features[0]:
            if key not in batch:
                batch[key] = [f[key] for f in features]
        return batch


class ZORewardTrainer(ZOTrainer):
    """A `ZOTrainer` whose objective is minus the mean reward of what each perturbed model generates.

    `reward_funcs`: callables or import paths with trl's signature, summed with `reward_weights`;
    `generation`: how completions are generated (`max_new_tokens`, stop strings, greedy or a temperature).
    With `zo_slice_directions` all q directions, both signs, decode in one `generate`, each for every prompt."""

    slices_rows = False
    objective_is_reward = True

    def __init__(self, *args, reward_funcs: Sequence[Callable | str] | Callable | str,
                 reward_weights: Sequence[float] | None = None, generation: Generation | None = None, **kwargs):
        rewards = RewardFunctions(reward_funcs, reward_weights)
        config = kwargs.get("args", args[1] if len(args) > 1 else None)  # Trainer(model, args, ...)
        shard = getattr(config, "zo_shard", "none")
        if shard != "none":  # before ZOTrainer shards the weights
            raise UserError(f"zo.shard={shard!r}: ZORewardTrainer generates with whole weights on every rank (the "
                            "ranks share out the population, not the weights); leave zo.shard unset")
        super().__init__(*args, **kwargs)
        if self.processing_class is None:
            raise TypeError("ZORewardTrainer needs processing_class=tokenizer: it decodes what the model generates")
        self.scorer = Scorer(self.processing_class, rewards, generation or Generation())
        self.data_collator.collator = PromptCollator(self.processing_class)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            self.value.items = batch_rows  # a batch's objective is a mean over its prompts
            self.value.rows = None  # no per-example record: the objective is no row's loss
            self.losses = PopulationRewards(self.losses.dual, self.zo, self.scorer)  # the engine StepLosses made
            self.zo.directions_split_across_ranks = True  # every rank has the whole batch: training_step
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if data_parallel():  # every rank takes all ranks' prompts, and its share of the population
            inputs = self._all_ranks_rows(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _all_ranks_rows(self, inputs: dict) -> dict:
        """The batch of every rank's rows, in rank order, collated as one process collates them."""
        columns = {key: value for key, value in inputs.items() if not torch.is_tensor(value)}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return self.data_collator([row for rank_rows in gathered for row in rank_rows])

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the prompt's text and the reward functions' columns are no forward's arguments

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`{prefix}_mean_reward` of what the model generates for the evaluation prompts (logged too)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs prompts: give eval_dataset (here or to the trainer)")
        metrics = {f"{metric_key_prefix}_mean_reward": self.mean_reward(dataset)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def mean_reward(self, dataset, batch_size: int | None = None) -> float:
        """The mean reward of what the model (θ, every update applied) generates greedily for `dataset`'s prompts."""
        self.flush()
        model, collate = self.model, PromptCollator(self.processing_class)
        batch_size = batch_size or self.args.per_device_eval_batch_size
        was_training, total = model.training, 0.0
        model.eval()
        try:
            for start in range(0, len(dataset), batch_size):
                batch = self._prepare_inputs(collate([dataset[i] for i in range(start, min(len(dataset),
                                                                                         start + batch_size))]))
                total += self.scorer.mean_reward(batch, self.scorer.completions(model, batch)) * batch_rows(batch)
        finally:
            model.train(was_training)
        return total / len(dataset)
