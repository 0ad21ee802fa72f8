"""A reward step's losses: what the models θ + a·z_k and θ + b·z_k generate, scored.

The ZO objective of a batch of prompts is minus the mean reward of the completions the model
generates for them. Out of place (the `dual` schedule) the whole population is decoded in **one
batched `generate`** with the KV cache, θ never moved: the prompts are repeated once per direction
(slice i of each half for direction k_i, with `slice_directions` all q of them) and doubled, and the
dual engine runs every module's first half at θ + a·z_{k_i} and its second at θ + b·z_{k_i}
(`zotune.dual`), so each row decodes as if its own perturbed model generated it alone. In place
(`sequential`, `fused`) the weights themselves move and each member generates on its own.

Greedy decoding (the default) makes a member's completions a function of its weights alone; sampled
decoding draws one step's numbers for all its members (`GumbelSampling`). Both routes give the same
tokens, which the tests hold them to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zotune.data.collate import PROMPT
from zotune.dual import DualEngine
from zotune.optim import ZOOptimizer
from zotune.reward.functions import RewardFunctions

SAMPLING = -4  # the direction index a step's sampling seed derives from: never a perturbation's


@dataclass(frozen=True)
class Generation:
    """How completions are generated: greedy (`temperature` None or 0), or sampled at `temperature`."""

    max_new_tokens: int = 32
    stop: tuple[str, ...] = field(default_factory=tuple)  # a completion is cut before the first of these
    temperature: float | None = None


class GumbelSampling:
    """Sampling at a temperature as greedy decoding of logits/T + Gumbel noise (the Gumbel-max trick), the
    noise a function of (seed, prompt, position, token) from `zotune.noise`: every member, both signs of
    every direction, draws the same numbers for the same prompt (common random numbers), and a resumed run
    draws them again. Rows are the prompts repeated: row r is prompt r mod `prompts`."""

    def __init__(self, seed: int, temperature: float, prompt_length: int, prompts: int, max_new_tokens: int):
        self.seed, self.temperature, self.prompt_length = seed, temperature, prompt_length
        self.prompts, self.max_new_tokens = prompts, max_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from zotune.noise import noise

        position, vocab = input_ids.shape[1] - self.prompt_length, scores.shape[1]
        normals = torch.stack([noise(self.seed, vocab, offset=(p * self.max_new_tokens + position) * vocab,
                                     device=scores.device) for p in range(self.prompts)])
        uniform = torch.special.ndtr(normals).clamp(torch.finfo(torch.float32).tiny, 1 - 2**-24)
        gumbel = -torch.log(-torch.log(uniform))
        rows = torch.arange(len(scores), device=scores.device) % self.prompts
        return scores.float() / self.temperature + gumbel[rows]


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation: Generation,
                 pad_id: int, eos_id: int | None, sampling_seed: int | None = None,
                 prompts: int | None = None) -> list[list[int]]:
    """Each row's completion tokens (left-padded prompts), cut after the end-of-sequence token. Sampled
    decoding (a `temperature`) draws from `sampling_seed`, the rows being `prompts` prompts repeated;
    without a seed (evaluation) it is greedy."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if generation.temperature and sampling_seed is not None:
        processors.append(GumbelSampling(sampling_seed, generation.temperature, input_ids.shape[1],
                                         prompts or len(input_ids), generation.max_new_tokens))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=generation.max_new_tokens,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                         temperature=None, top_p=None, top_k=None, logits_processor=processors)
    completions = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        completions.append(row)
    return completions


class Scorer:
    """What a model generates for a batch of prompts, and the mean reward of it."""

    def __init__(self, tokenizer, rewards: RewardFunctions, generation: Generation):
        self.tokenizer, self.rewards, self.generation = tokenizer, rewards, generation
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def completions(self, model, inputs: dict, sampling_seed: int | None = None,
                    prompts: int | None = None) -> list[list[int]]:
        return generate_ids(model, inputs["input_ids"], inputs["attention_mask"], self.generation, self.pad_id,
                            self.tokenizer.eos_token_id, sampling_seed, prompts)

    def mean_reward(self, inputs: dict, completion_ids: list[list[int]]) -> float:
        completions = [cut(self.tokenizer.decode(c, skip_special_tokens=True), self.generation.stop)
                       for c in completion_ids]
        columns = {k: v for k, v in inputs.items() if k != PROMPT and not torch.is_tensor(v)}
        rewards = self.rewards(completions, inputs[PROMPT], completion_ids, columns)
        return sum(rewards) / len(rewards)


class PopulationRewards:
    """The (L_a, L_b) pairs of a batch of prompts (`loss_fn`), L = −mean reward, for `ZOOptimizer.estimate`."""

    checked = True  # no check of the schedule: generation runs the engine as it is

    def __init__(self, dual: DualEngine | None, zo: ZOOptimizer, scorer: Scorer):
        """`dual`: the engine wrapping the model's modules (None in place): the trainer's own, not a second one."""
        self.scorer, self.zo, self.dual = scorer, zo, dual

    def sampling_seed(self) -> int | None:
        """The sampling seed of the micro-batch being estimated: one for every member (common random
        numbers) and every rank (each has the whole batch), another for each micro-batch; None: greedy."""
        from zotune.noise import seed_for, step_seed

        if not self.scorer.generation.temperature:
            return None
        where = f"sampling:{self.zo.micro_batches_estimated}"
        return seed_for(step_seed(self.zo.seed, self.zo.current_step), SAMPLING, where)

    def loss_fn(self, model, inputs: dict) -> Callable:
        if self.dual is None:
            return lambda: -self.scorer.mean_reward(inputs, self.scorer.completions(model, inputs,
                                                                                    self.sampling_seed()))

        def losses(seed: int, k):
            ks = k if isinstance(k, tuple) else (k,)
            pairs = self.population(model, inputs, seed, ks)
            return pairs if isinstance(k, tuple) else pairs[0]
        return losses

    def population(self, model, inputs: dict, seed: int, ks: tuple[int, ...]) -> list[tuple[float, float]]:
        """The pairs of directions `ks`: every member, both signs, decoded in one `generate`."""
        prompts, m = len(inputs["input_ids"]), len(ks)
        rows = self.population_ids(model, inputs, seed, ks)
        losses = [-self.scorer.mean_reward(inputs, rows[j * prompts:(j + 1) * prompts]) for j in range(2 * m)]
        return [(losses[i], losses[m + i]) for i in range(m)]

    def population_ids(self, model, inputs: dict, seed: int, ks: tuple[int, ...]) -> list[list[int]]:
        """The completions of every member for the batch's prompts, in one `generate`: the prompts
        repeated for θ + a·z_{k_0}, ..., θ + a·z_{k_{m−1}}, then θ + b·z_{k_0}, ..., θ + b·z_{k_{m−1}}."""
        prompts, m = len(inputs["input_ids"]), len(ks)
        doubled = {key: inputs[key].repeat(2 * m, 1) for key in ("input_ids", "attention_mask")}
        with self.dual.dual_forward(m * prompts, (seed, ks)):
            return self.scorer.completions(model, doubled, self.sampling_seed(), prompts)


def cut(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the stop strings."""
    ends = [text.index(s) for s in stop if s in text]
    return text[:min(ends)] if ends else text
