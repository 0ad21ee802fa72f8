"""The dual schedule: both perturbed forwards in one pass over a doubled batch (DESIGN §3).

Every module that directly owns trainable parameters gets its forward wrapped. Inside
a dual forward the wrapper

1. moves its own parameters to θ + εz and runs the first half of its inputs,
2. moves them to θ − εz and runs the second half,
3. concatenates the two outputs,

so every module sees the weights its half of the batch would have seen in MeZO's two
separate forwards, and each weight is regenerated twice per step instead of four times.
Where the moves come from (`ZOOptimizer.touch`) the same per-parameter state machine serves
every schedule, so the numbers equal `sequential` within float rounding.

Splitting rule for a wrapped module's tensor inputs: a first dimension that is a
multiple of 2B splits in halves (batch-major flattening such as OPT's (B·T, D) keeps the
halves aligned); a first dimension of 1 is shared by both halves, and both outputs are
expanded to B rows; anything else is refused with `DualRefused`.

A module that owns parameters and calls children that own parameters (nested owners)
runs each half with its children pinned to the same sign: the children then move, but
do not split again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from zotune.models import unwrapped

# Containers whose forward never runs: their parameters belong to the module that holds them
# (peft's IA3 keeps its vectors in a ParameterDict that its layer indexes)
PARAMETER_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _own_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters `module` uses directly: its own and those of its parameter containers."""
    yield from module.parameters(recurse=False)
    for child in module.children():
        if isinstance(child, PARAMETER_CONTAINERS):
            yield from child.parameters()


class DualRefused(Exception):
    """A wrapped module got inputs the splitting rule cannot split; use another schedule."""


class DualEngine:
    """Wraps a model's parameter-owning modules so that one forward runs both ± halves."""

    def __init__(self, model: nn.Module, optimizer):
        self.optimizer = optimizer
        self.direction: tuple[int, int] | None = None  # (step seed, k) during a dual forward
        self.probing = False  # checking the splitting rule on unperturbed weights
        self.half: int | None = None  # set while a nested owner runs one half
        self.batch = 0  # B, the rows of one half
        names = {id(p): name for name, p, _ in optimizer.named_params()}  # a tied weight has one name
        self._originals: list[tuple[nn.Module, Callable, bool]] = []
        for module in model.modules():
            if isinstance(module, PARAMETER_CONTAINERS):
                continue
            own = [(names[id(p)], p) for p in _own_parameters(module) if id(p) in names]
            if own:
                self._wrap(module, own)

    def _wrap(self, module: nn.Module, params: list[tuple[str, nn.Parameter]]) -> None:
        original = module.forward
        patched_before = "forward" in module.__dict__  # e.g. by accelerate hooks: restored on remove()

        def forward(*args, **kwargs):
            if self.direction is None and not self.probing:
                return original(*args, **kwargs)
            return self._call(original, params, args, kwargs)

        module.forward = forward
        self._originals.append((module, original, patched_before))

    def remove(self) -> None:
        """Unwrap every module."""
        for module, original, patched_before in self._originals:
            if patched_before:
                module.forward = original
            else:
                del module.forward
        self._originals.clear()

    # -- one wrapped call ---------------------------------------------------------------

    def _call(self, original: Callable, params, args: tuple, kwargs: dict):
        if self.half is not None:  # inside a nested owner's half: move, don't split
            self._move(params, self.half)
            return original(*args, **kwargs)
        halves, shared = _split((args, kwargs), self.batch)
        joined = None
        for half, (h_args, h_kwargs) in enumerate(halves):
            self._move(params, half)
            self.half = half
            try:
                joined = _place(joined, original(*h_args, **h_kwargs), half, self.batch if shared else None)
            finally:
                self.half = None
        if self.probing:
            _check_halves_agree(halves)
        return tree_unflatten(*joined)

    def _move(self, params, half: int) -> None:
        """The first half runs at the estimator's first offset (θ + εz), the second at its other."""
        if not self.probing:
            s, k = self.direction
            self.optimizer.touch(params, (s, k, self.optimizer.offsets[half]))

    # -- forwards ---------------------------------------------------------------------

    @contextmanager
    def dual_forward(self, batch: int, direction: tuple[int, int] | None) -> Iterator[None]:
        """Within this context the model runs dual on a batch of 2·`batch` rows.

        `direction=None` probes: the weights stay unperturbed and every wrapped module checks
        that its two input halves agree, which a split that does not follow the batch would break.
        """
        self.batch, self.direction, self.probing = batch, direction, direction is None
        try:
            yield
        finally:
            self.direction, self.probing, self.half = None, False, None


def double(inputs: dict, batch: int) -> dict:
    """The batch stacked on itself: rows [0, B) run at θ+εz, rows [B, 2B) at θ−εz."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
            for k, v in inputs.items()}


def _split(tree, batch: int):
    """Both halves of every tensor leaf in `tree`, and whether all of them were shared (first dim 1)."""
    leaves, spec = tree_flatten(tree)
    firsts, seconds, all_shared, any_tensor = [], [], True, False
    for leaf in leaves:
        if torch.is_tensor(leaf) and leaf.dim() > 0:
            any_tensor = True
            rows = leaf.shape[0]
            if rows % (2 * batch) == 0:
                first, second = leaf.chunk(2)
                all_shared = False
            elif rows == 1:
                first = second = leaf
            else:
                raise DualRefused(f"an input of shape {tuple(leaf.shape)} is neither a multiple of 2×{batch} rows nor 1")
        else:
            first = second = leaf
        firsts.append(first)
        seconds.append(second)
    if not any_tensor:
        raise DualRefused("a parameter-owning module was called without tensor inputs")
    return [tree_unflatten(firsts, spec), tree_unflatten(seconds, spec)], all_shared


def _place(joined, output, half: int, shared_batch: int | None):
    """Write one half's output into the joined output, allocated at the first half.

    Copying each half in as it comes keeps the peak at 1.5× the joined output (a
    concatenation at the end holds both halves and the result, 2×): for a model's head,
    whose output is the logits, that is the largest tensor of the forward.
    """
    leaves, spec = tree_flatten(output)
    if joined is None:
        joined = ([_allocate(v, shared_batch) for v in leaves], spec)
    for out, v in zip(joined[0], leaves):
        if torch.is_tensor(out):
            rows = out.shape[0] // 2
            out[half * rows:(half + 1) * rows] = v  # a broadcast (1-row) output expands to B rows
    return joined


def _allocate(v, shared_batch: int | None):
    if not torch.is_tensor(v):
        return v
    if v.dim() == 0:
        raise DualRefused("a parameter-owning module returned a scalar tensor")
    if shared_batch is not None and v.shape[0] != 1:
        raise DualRefused(f"a broadcast input gave an output of {v.shape[0]} rows")
    rows = shared_batch if shared_batch is not None else v.shape[0]
    return v.new_empty((2 * rows, *v.shape[1:]))


def _check_halves_agree(halves) -> None:
    firsts, _ = tree_flatten(halves[0])
    seconds, _ = tree_flatten(halves[1])
    for a, b in zip(firsts, seconds):
        if torch.is_tensor(a) and a is not b and a.is_floating_point():
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, a.abs().max().item())):
                raise DualRefused("the two halves of a module's input differ: its input is not batch-major")


def half_losses(engine: DualEngine, model, inputs: dict, direction: tuple[int, int] | None,
                loss_of_outputs: Callable) -> tuple[float, float]:
    """(L+, L−): the losses of the two halves of one dual forward of `inputs` doubled.

    `loss_of_outputs(outputs, labels)` computes one half's loss from its slice of the outputs."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    batch = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim())
    with engine.dual_forward(batch, direction):
        outputs = model(**double(inputs, batch))
    return tuple(loss_of_outputs(_rows(outputs, half, batch), labels) for half in (0, 1))


def model_loss(model, outputs, labels) -> float:
    """The loss a transformers model computes from its own outputs and labels (by its loss type)."""
    base = unwrapped(model)
    if not hasattr(base, "loss_function"):
        raise DualRefused(f"{type(base).__name__} is not a transformers model; give compute_loss_func")
    loss_type, config = getattr(base, "loss_type", None), base.config
    if loss_type == "ForSequenceClassification":
        loss = base.loss_function(labels=labels, pooled_logits=outputs.logits, config=config)
    elif loss_type == "ForTokenClassification":
        loss = base.loss_function(outputs.logits, labels, config)
    elif loss_type in (None, "ForCausalLM", "ForMaskedLM", "ForConditionalGeneration"):
        # None: PreTrainedModel.loss_function defaults to the causal LM loss too
        loss = base.loss_function(logits=outputs.logits, labels=labels, vocab_size=config.vocab_size)
    else:
        raise DualRefused(f"no per-half loss for a model of loss type {loss_type!r}")
    return loss.item()


def _rows(outputs, half: int, batch: int):
    """One half of a model output: every tensor with 2B rows cut to its half."""
    leaves, spec = tree_flatten(outputs)
    cut = [v[half * batch:(half + 1) * batch] if torch.is_tensor(v) and v.dim() and v.shape[0] == 2 * batch else v
           for v in leaves]
    return tree_unflatten(cut, spec)


def losses_agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
