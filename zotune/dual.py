"""The dual schedule: both perturbed forwards in one pass over a doubled batch, θ never moved
(DESIGN §3).

Every module that directly owns trainable parameters gets its forward wrapped. Inside
a dual forward the wrapper

1. runs the first half of its inputs with its own parameters replaced by θ + εz,
2. runs the second half with them replaced by θ − εz, the first copy reflected through θ
   (2θ − copy: z is generated once for both halves),
3. joins the two outputs; a Linear or Conv1D writes each half's product straight into them,

so every module sees the weights its half of the batch would have seen in MeZO's two
separate forwards, to an ulp. The perturbed copies are made for the call (`ZOOptimizer.perturbed`) and
freed after it; the parameters themselves only ever hold θ, so there is nothing to restore and
a 16-bit weight needs no fp32 master copy. How much a copy takes is `zotune.scratch`'s rule:
an Embedding copies only the rows it looks up, a large Linear runs in chunks of output rows,
any other module copies its own parameters; `ScratchTracker` counts them while they live.

Splitting rule for a wrapped module's tensor inputs: a first dimension that is a
multiple of 2B splits in halves (batch-major flattening such as OPT's (B·T, D) keeps the
halves aligned); a first dimension of 1 is shared by both halves, and both outputs are
expanded to B rows; anything else is refused with `DualRefused`. A model that cannot be split
runs the two signs as two forwards through the same wrappers (`dual_forward(..., half=h)`).

A module that owns parameters and calls children that own parameters (nested owners)
runs each half with its children pinned to the same sign: they run on their own perturbed
copies, but do not split again.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from zotune import scratch
from zotune.models import unwrapped
from zotune.batch import batch_rows, is_per_row
from zotune.optim import Point

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


@dataclass
class ScratchTracker:
    """Bytes of perturbed copies alive, counted from their allocation until the tensor is freed."""

    live: int = 0
    peak: int = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, nbytes)
        return t

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


class DualEngine:
    """Wraps a model's parameter-owning modules so that they run on perturbed copies of their
    own parameters: both ± halves in one forward of the doubled batch, or one sign per forward."""

    def __init__(self, model: nn.Module, optimizer):
        self.optimizer = optimizer
        self.direction: tuple[int, tuple[int, ...]] | None = None  # (step seed, its k's) in a perturbed forward
        self.probing = False  # checking the splitting rule on unperturbed weights
        self.half: int | None = None  # the block a nested owner runs, or the sign a one-sign forward runs
        self.batch = 0  # B, the rows of one half
        self.tracker = ScratchTracker()
        self.depth = 0  # wrapped calls running: a weight read outside them sees θ, never a perturbed copy
        self._rows_ok: dict[nn.Module, bool] = {}  # Embeddings: whether renumbering their input is faithful
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
        run = self._runner(module, params)

        def forward(*args, **kwargs):
            if self.direction is None and not self.probing:
                return original(*args, **kwargs)
            self.depth += 1
            try:
                return self._call(original, run, args, kwargs)
            finally:
                self.depth -= 1

        module.forward = forward
        self._originals.append((module, original, patched_before))

    def _runner(self, module: nn.Module, params) -> Callable:
        """How `module` runs at one sign (`zotune.scratch`): on its looked-up rows; as a product
        written into its output (nn.Linear, in chunks of output rows when large; Conv1D); or on
        whole perturbed copies. Structured directions take whole copies."""
        kind = scratch.strategy(module) if self.optimizer.estimator.plain else "whole"
        form = scratch.linear_form(module)
        if (kind == "rows" or form) and any(p is module.weight for _, p in params):
            weight = next((n, p) for n, p in params if p is module.weight)
            rest = [(n, p) for n, p in params if p is not module.weight]
            if kind == "rows":
                return functools.partial(self._run_rows, module, weight, rest)
            rows = scratch.chunk_rows(weight[1]) if kind == "chunks" else None
            return functools.partial(self._run_linear, module, form, weight, rest, rows)
        return functools.partial(self._run_whole, params)

    def remove(self) -> None:
        """Unwrap every module."""
        for module, original, patched_before in self._originals:
            if patched_before:
                module.forward = original
            else:
                del module.forward
        self._originals.clear()

    # -- one wrapped call ---------------------------------------------------------------

    @property
    def blocks(self) -> int:
        """The blocks of rows a call splits into: the two halves, each cut into one slice per direction."""
        return 2 * (len(self.direction[1]) if self.direction else 1)

    def point(self, block: int) -> Point:
        """Block j of 2m (m directions): its half's offset (j // m) and its slice's direction (j % m)."""
        s, ks = self.direction
        return Point(s, ks[block % len(ks)], self.optimizer.offsets[block // len(ks)])

    def order(self) -> list[int]:
        """The blocks direction by direction, each direction's + block before its − block, so the
        second reflects the first's copy (`_copy`)."""
        m = self.blocks // 2
        return [j for k in range(m) for j in (k, k + m)]

    def _call(self, original: Callable, run: Callable, args: tuple, kwargs: dict):
        if self.half is not None:  # inside a nested owner's block, or a one-sign forward: don't split
            return self._at_half(original, run, self.half, args, kwargs, {})
        blocks, shared = _split((args, kwargs), self.batch, self.blocks)
        buffers = {}  # the perturbed copies, reflected for a direction's − block
        if run.func == self._run_linear and not shared and not self.probing:
            x = _input(args, kwargs)
            if not torch.is_autocast_enabled(x.device.type):
                return self._linear(*run.args, x, [self.point(j) for j in range(self.blocks)], buffers)
        joined = None
        for j in self.order():
            self.half = j
            try:
                out = self._at_half(original, run, j, *blocks[j], buffers)
                joined = _place(joined, out, j, self.blocks, self.batch if shared else None)
            finally:
                self.half = None
        if self.probing:
            _check_halves_agree(blocks)
        return tree_unflatten(*joined)

    def _at_half(self, original, run, block: int, args, kwargs, buffers: dict):
        """Block j runs at `point(j)`: the first half at the estimator's first offset (θ + εz), the second
        at its other; with one direction per slice, each slice of a half at its direction's z."""
        if self.probing:
            return original(*args, **kwargs)
        return run(original, self.point(block), args, kwargs, buffers)

    def _buffer(self, buffers: dict, key, shape, like: torch.Tensor) -> torch.Tensor:
        if key not in buffers:
            buffers[key] = self.tracker.track(torch.empty(shape, dtype=like.dtype, device=like.device))
        return buffers[key]

    def _copy(self, buffers: dict, name: str, p: nn.Parameter, at: Point, span: tuple[int, int, int] | None = None):
        """θ + at.coef·z for `p`, or for its rows lo..hi given `span` = (lo, hi, rows of the buffer),
        in a buffer kept for the call. The second point of a ± pair is the reflection of the first's
        copy (`ZOOptimizer.reflects`): taken from the buffer when the first half just filled it, so
        z is generated once for both, and the same numbers when a forward runs one sign."""
        lo = 0 if span is None else span[0]
        if span is None:
            out = self._buffer(buffers, name, p.shape, p)
        else:
            out = self._buffer(buffers, name, (span[2], *p.shape[1:]), p)[:span[1] - lo]
        first = Point(at.seed, at.k, -at.coef)
        if self.optimizer.placement.reflects(at, p):
            if buffers.get(("at", name)) != (first, lo):
                self._perturbed(name, p, first, out, span)
            self.optimizer.placement.reflect(p, out, ... if span is None else slice(lo, span[1]))
        else:
            self._perturbed(name, p, at, out, span)
        buffers[("at", name)] = (at, lo)
        return out

    def _perturbed(self, name: str, p: nn.Parameter, at: Point, out: torch.Tensor, span) -> None:
        if span is None:
            self.optimizer.placement.perturbed(name, p, at, out)
        else:
            self.optimizer.placement.perturbed_range(name, p, span[0], span[1], at, out)

    def _run_whole(self, params, original, at: Point, args, kwargs, buffers: dict):
        """Every own parameter replaced by θ + c·z for the call; θ itself is not touched."""
        saved = []
        try:
            for name, p in params:
                out = self._copy(buffers, name, p, at)
                saved.append((p, p.data))
                p.data = out
            return original(*args, **kwargs)
        finally:
            for p, data in saved:
                p.data = data

    def _run_rows(self, module: nn.Embedding, weight, rest, original, at: Point, args, kwargs, buffers: dict):
        """An Embedding: only the rows its input looks up are perturbed; the input is renumbered
        to index them. A subclass may compute its indices from its input (OPT's positions come from
        the attention mask): the first call checks, at θ, that renumbering gives the module's own
        output, and a module that fails the check gets whole copies from then on."""
        name, p = weight
        if module not in self._rows_ok:
            self._rows_ok[module] = self._renumbering_holds(module, p, original, args, kwargs)
        if not self._rows_ok[module]:
            return self._run_whole([weight, *rest], original, at, args, kwargs, buffers)
        rows, args, kwargs = _renumbered(args, kwargs)
        table = self.tracker.track(self.optimizer.placement.perturbed_rows(name, p, rows, at))
        with _embedding_table(module, p, table):
            return self._run_whole(rest, original, at, args, kwargs, buffers)

    def _renumbering_holds(self, module: nn.Embedding, p: nn.Parameter, original, args, kwargs) -> bool:
        expected = original(*args, **kwargs)
        try:
            rows, r_args, r_kwargs = _renumbered(args, kwargs)
            with _embedding_table(module, p, p.data[rows]):
                got = original(*r_args, **r_kwargs)
        except Exception:  # noqa: BLE001 - e.g. an index computed from a renumbered mask runs out of range
            return False
        return torch.is_tensor(got) and got.shape == expected.shape and torch.equal(got, expected)

    def _run_linear(self, module, form, weight, rest, rows, original, at: Point, args, kwargs, buffers: dict):
        """One sign of a Linear or Conv1D (`_linear`); under autocast, its own forward on whole copies,
        since a product written into a given output skips autocast's casts."""
        x = _input(args, kwargs)
        if torch.is_autocast_enabled(x.device.type):
            return self._run_whole([weight, *rest], original, at, args, kwargs, buffers)
        return self._linear(module, form, weight, rest, rows, x, [at], buffers)

    def _linear(self, module, form: str, weight, rest, rows: int | None, x: torch.Tensor, points: list[Point],
                buffers: dict) -> torch.Tensor:
        """y = x·Wᵀ + b (Conv1D: x·W + b), the i-th block of x's rows at points[i], each block's product
        written straight into one output. Given `rows`, W is perturbed that many output rows at a
        time (a large Linear: a tied LM head over a large vocabulary never has a whole copy)."""
        (name, w), bias = weight, module.bias
        b_name = next((n for n, p in rest if p is bias), None)  # None: no bias, or a frozen one
        features = w.shape[0] if form == "linear" else w.shape[1]
        out = x.new_empty((*x.shape[:-1], features))
        xs, ys = x.reshape(len(points), -1, x.shape[-1]), out.view(len(points), -1, features)
        for lo in range(0, features, rows or features):
            hi = min(lo + (rows or features), features)
            span = None if rows is None else (lo, hi, rows)
            for i in self.order() if len(points) == self.blocks else range(len(points)):
                x_i, y_i, at = xs[i], ys[i], points[i]
                w_at = self._copy(buffers, name, w, at, span)
                if bias is None or b_name is None:
                    b_at = None if bias is None else bias[lo:hi]
                else:
                    b_at = self._copy(buffers, b_name, bias, at, span)
                w_at = w_at.t() if form == "linear" else w_at
                if b_at is None:
                    torch.mm(x_i, w_at, out=y_i[:, lo:hi])
                else:
                    torch.addmm(b_at, x_i, w_at, out=y_i[:, lo:hi])
        return out

    # -- forwards ---------------------------------------------------------------------

    @contextmanager
    def dual_forward(self, batch: int, direction: tuple[int, int | tuple[int, ...]] | None,
                     half: int | None = None) -> Iterator[None]:
        """Within this context the model runs on a batch of 2·`batch` rows, each module's first half
        at θ + a·z and its second at θ + b·z; given `half`, the whole batch runs at that one sign.
        `direction` is (step seed, k); given several k's (k_0..k_{m−1}), each half is cut into m
        slices of batch/m rows, slice i at z_{k_i}: m directions in one forward.

        `direction=None` probes: the weights stay unperturbed and every wrapped module checks
        that its two input halves agree, which a split that does not follow the batch would break.
        """
        if direction is not None:
            s, ks = direction
            direction = (s, ks if isinstance(ks, tuple) else (ks,))
        self.batch, self.direction, self.probing, self.half = batch, direction, direction is None, half
        try:
            yield
        finally:
            self.direction, self.probing, self.half = None, False, None


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of a Linear or Conv1D call."""
    return args[0] if args else kwargs["input" if "input" in kwargs else "x"]


def _renumbered(args: tuple, kwargs: dict):
    """The distinct indices of the first integer tensor input, and the inputs with it replaced by
    each element's position among them."""
    leaves, spec = tree_flatten((args, kwargs))
    i = next(j for j, v in enumerate(leaves) if torch.is_tensor(v) and not v.is_floating_point())
    rows, leaves[i] = torch.unique(leaves[i], return_inverse=True)
    args, kwargs = tree_unflatten(leaves, spec)
    return rows, args, kwargs


@contextmanager
def _embedding_table(module: nn.Embedding, p: nn.Parameter, table: torch.Tensor) -> Iterator[None]:
    """`module` runs with `table` as its weight. `padding_idx` only shapes gradients, and would index
    the full table."""
    data, p.data = p.data, table
    padding_idx, module.padding_idx = module.padding_idx, None
    try:
        yield
    finally:
        p.data, module.padding_idx = data, padding_idx


def double(inputs: dict, batch: int) -> dict:
    """The batch stacked on itself: rows [0, B) run at θ+εz, rows [B, 2B) at θ−εz."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
            for k, v in inputs.items()}


def _split(tree, batch: int, blocks: int = 2):
    """Every tensor leaf of `tree` cut into `blocks` blocks of rows, as (args, kwargs) per block, and
    whether all of them were shared (first dim 1, the same in every block)."""
    leaves, spec = tree_flatten(tree)
    cut, all_shared, any_tensor = [], True, False
    for leaf in leaves:
        if torch.is_tensor(leaf) and leaf.dim() > 0:
            any_tensor = True
            rows = leaf.shape[0]
            if rows % (2 * batch) == 0:
                cut.append(leaf.chunk(blocks))
                all_shared = False
            elif rows == 1:
                cut.append([leaf] * blocks)
            else:
                raise DualRefused(f"an input of shape {tuple(leaf.shape)} is neither a multiple of 2×{batch} rows "
                                  "nor 1")
        else:
            cut.append([leaf] * blocks)
    if not any_tensor:
        raise DualRefused("a parameter-owning module was called without tensor inputs")
    return [tree_unflatten([c[j] for c in cut], spec) for j in range(blocks)], all_shared


def _place(joined, output, block: int, blocks: int, shared_batch: int | None):
    """Write one block's output into the joined output, allocated at the first block.

    Copying each block in as it comes keeps the peak at 1.5× the joined output (a
    concatenation at the end holds both halves and the result, 2×): for a model's head,
    whose output is the logits, that is the largest tensor of the forward.
    """
    leaves, spec = tree_flatten(output)
    if joined is None:
        joined = ([_allocate(v, blocks, shared_batch) for v in leaves], spec)
    for out, v in zip(joined[0], leaves):
        if torch.is_tensor(out):
            rows = out.shape[0] // blocks
            out[block * rows:(block + 1) * rows] = v  # a broadcast (1-row) output expands to its rows
    return joined


def _allocate(v, blocks: int, shared_batch: int | None):
    if not torch.is_tensor(v):
        return v
    if v.dim() == 0:
        raise DualRefused("a parameter-owning module returned a scalar tensor")
    if shared_batch is not None and v.shape[0] != 1:
        raise DualRefused(f"a broadcast input gave an output of {v.shape[0]} rows")
    rows = 2 * shared_batch if shared_batch is not None else blocks * v.shape[0]
    return v.new_empty((rows, *v.shape[1:]))


def _check_halves_agree(halves) -> None:
    firsts, _ = tree_flatten(halves[0])
    seconds, _ = tree_flatten(halves[1])
    for a, b in zip(firsts, seconds):
        if torch.is_tensor(a) and a is not b and a.is_floating_point():
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, a.abs().max().item())):
                raise DualRefused("the two halves of a module's input differ: its input is not batch-major")


def call_halves(engine: DualEngine, model: nn.Module, direction: tuple[int, int] | None,
                value: Callable[[], torch.Tensor | float]) -> tuple[float, float]:
    """(L+, L−) of `value()`, any function that calls `model` on a batch and reduces what it returns
    (a Trainer's `compute_loss`, a trl trainer's), without knowing how it reduces.

    `value` runs twice. In its first run each call of `model` runs the call's batch doubled, in one
    dual forward, and returns the first half's outputs, keeping the second half's; in its second
    run the calls return those, in the same order. So each run computes its value on one half
    exactly as it would on the plain batch. `labels` are taken out of the doubled call, and each
    half's loss is the model's own on its half (`model_loss`); a loss the model reduced over the
    doubled batch is dropped from the halves."""
    kept: list = []
    original = model.forward

    def doubled(*args, **kwargs):
        _keyword_only(args)
        halves = _blocks_of_doubled(engine, model, original, kwargs, direction, [kwargs.get("labels")])
        kept.append(halves[1])
        return halves[0]

    def replayed(*args, **kwargs):
        if not kept:
            raise DualRefused("the loss called the model more often on its second run than on its first")
        return kept.pop(0)

    values = []
    with _forward_replaced(model) as replace:
        for forward in (doubled, replayed):
            replace(forward)
            values.append(float(value()))
    if kept:
        raise DualRefused("the loss called the model less often on its second run than on its first")
    return values[0], values[1]


class _Captured(Exception):
    """Raised by a model call whose inputs were only to be seen."""


def call_slices(engine: DualEngine, model: nn.Module, seed: int, ks: Sequence[int],
                value_of_slice: Callable[[int], torch.Tensor | float]) -> list[tuple[float, float]]:
    """(L_a, L_b) of each direction k_i of `ks`, measured on the i-th of m = len(ks) equal slices of
    the batch's rows, from one dual forward: m directions for the forwards of one (MobiZO's
    batch split, Tang et al., 2024, arXiv:2409.15520).

    `value_of_slice(i)` computes the value on slice i's rows, calling `model` once. It runs m times
    without any forward (each model call only shows its inputs), then the slices' inputs, stacked,
    run doubled in one forward whose every module runs slice i of its first half at θ + a·z_{k_i}
    and of its second at θ + b·z_{k_i}; then `value_of_slice` runs once per block, its model call
    returning that block's outputs."""
    m, original = len(ks), model.forward
    captured: list[dict] = []

    def capture(*args, **kwargs):
        _keyword_only(args)
        captured.append(kwargs)
        raise _Captured

    with _forward_replaced(model) as replace:
        replace(capture)
        for i in range(m):
            try:
                value_of_slice(i)
            except _Captured:
                continue
            raise DualRefused("the value did not call the model")
        rows = {batch_rows(c) for c in captured}
        if len(rows) != 1:
            raise DualRefused(f"the slices have different numbers of rows {sorted(rows)}")
        whole = {key: torch.cat([c[key] for c in captured]) if is_per_row(v, *rows) else v
                 for key, v in captured[0].items()}
        blocks = _blocks_of_doubled(engine, model, original, whole, (seed, tuple(ks)),
                                    [c.get("labels") for c in captured])
        values = []
        for j, block in enumerate(blocks):
            served = [block]

            def serve(*args, **kwargs):
                if not served:
                    raise DualRefused("the value called the model more than once; slicing directions needs one call")
                return served.pop()

            replace(serve)
            values.append(float(value_of_slice(j % m)))
    return [(values[i], values[m + i]) for i in range(m)]


def _keyword_only(args: tuple) -> None:
    if args:
        raise DualRefused("the model was called with positional inputs; the dual split needs keyword inputs")


def _blocks_of_doubled(engine: DualEngine, model: nn.Module, original: Callable, kwargs: dict, direction,
                       labels: list) -> list:
    """The outputs of one dual forward of `kwargs` doubled, cut into its blocks (the two halves, each
    cut into one slice per direction), each with the model's own loss of its block given the labels
    of its slice (`labels[i]`); `labels` are taken out of the forward."""
    kwargs = dict(kwargs)
    # a fused head (trl's `fused_lm_head=True`) scores the labels inside the forward: they go in doubled
    if not kwargs.get("fused_lm_head"):
        kwargs.pop("labels", None)
    else:
        labels = [None] * len(labels)
    batch = batch_rows(kwargs)
    with engine.dual_forward(batch, direction):
        outputs = original(**double(kwargs, batch))
        n = engine.blocks
    blocks = [rows_of(outputs, j, n, 2 * batch) for j in range(n)]
    if labels[0] is not None:
        return [_with_loss(b, model_loss(model, b, labels[j % len(labels)])) for j, b in enumerate(blocks)]
    if torch.is_tensor(outputs.get("loss") if isinstance(outputs, dict) else None):
        return [_with_loss(b, None) for b in blocks]  # reduced over the whole batch: no block's loss
    return blocks


@contextmanager
def _forward_replaced(model: nn.Module) -> Iterator[Callable]:
    """Yields a function that replaces `model.forward`; the original is back on exit."""
    patched_before = "forward" in model.__dict__
    original = model.forward
    try:
        yield lambda forward: setattr(model, "forward", forward)
    finally:
        if patched_before:
            model.forward = original
        else:
            del model.forward


def _with_loss(outputs, loss: torch.Tensor):
    """`outputs` (a transformers ModelOutput) with `loss` as its first field, as the model returns it given labels."""
    return type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k != "loss"})


# Tensor methods that read or set a parameter's metadata, not its values
_METADATA = {"dim", "size", "numel", "element_size", "stride", "is_floating_point", "is_complex", "data_ptr",
             "is_contiguous", "__len__", "__hash__", "__get__", "__set__", "__format__", "__repr__", "detach",
             "requires_grad_", "retain_grad", "register_hook"}


class OutsideReads(TorchFunctionMode):
    """Records the trainable parameters whose values an operation reads outside the engine's wrapped
    calls (a penalty on θ in a loss; a model that applies a weight outside the module that owns it):
    there they hold θ, never a perturbed copy, so the step would not see their perturbation."""

    def __init__(self, engine: DualEngine):
        super().__init__()
        self.engine = engine
        self.names = {id(p): name for name, p, _ in engine.optimizer.named_params()}
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.engine.depth and getattr(func, "__name__", "") not in _METADATA:
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.names:
                    self.found.add(self.names[id(leaf)])
        return func(*args, **kwargs)


def model_loss(model, outputs, labels) -> torch.Tensor:
    """The loss a transformers model computes from its own outputs and labels (by its loss type)."""
    base = unwrapped(model)
    if not hasattr(base, "loss_function"):
        raise DualRefused(f"{type(base).__name__} is not a transformers model; give compute_loss_func")
    loss_type, config = getattr(base, "loss_type", None), base.config
    if loss_type == "ForSequenceClassification":
        loss = base.loss_function(labels=labels, pooled_logits=outputs.logits, config=config)
    elif loss_type == "ForTokenClassification":
        loss = base.loss_function(outputs.logits, labels, config)
    elif loss_type in (None, "ForCausalLM"):  # None: PreTrainedModel.loss_function defaults to the causal LM loss
        loss = causal_lm_loss(outputs.logits, labels)
    elif loss_type in ("ForMaskedLM", "ForConditionalGeneration"):
        loss = base.loss_function(logits=outputs.logits, labels=labels, vocab_size=config.vocab_size)
    else:
        raise DualRefused(f"no per-half loss for a model of loss type {loss_type!r}")
    return loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal LM loss (next-token cross-entropy, mean over labels other than -100),
    over chunks of rows: the log-softmax of a half's logits is never held whole, so the doubled
    batch's logits plus one chunk stay within inference's logits plus their log-softmax."""
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, scratch.CHUNK_ELEMENTS // flat.shape[-1])
    total = sum(F.cross_entropy(flat[lo:lo + rows].float(), targets[lo:lo + rows], reduction="sum")
                for lo in range(0, len(flat), rows))
    return total / (targets != -100).sum()


def rows_of(outputs, block: int, blocks: int, rows: int):
    """One block of a model output: every tensor with `rows` rows cut to its block of `blocks`."""
    leaves, spec = tree_flatten(outputs)
    size = rows // blocks
    cut = [v[block * size:(block + 1) * size] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
           for v in leaves]
    return tree_unflatten(cut, spec)


def losses_agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
