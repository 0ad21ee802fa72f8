"""w and u: two sets of trainable weights over one model, and LISA-style layer sampling.

Three ways to hold them, cheapest first (docs/scalebio.md):

- `adapters`: two peft adapters on one frozen base (`default` is w, `u` is u). Switching is
  `set_adapter`; the extra memory is one more adapter.
- `param_sets`: the model's own trainable weights are w; u is a second copy of the trainable
  weights only, swapped in for a forward with `torch.func.functional_call`. Extra memory: the
  trainable weights once more (the whole model, when everything trains).
- `full_copies`: a deep copy of the whole model holds u (ScaleBiO's reference code). Extra
  memory: a whole model, frozen weights included. Only a fallback, for models that
  `functional_call` cannot run.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch.func import functional_call

from zotune.blocks import find_blocks
from zotune.errors import UserError
from zotune.models import stable_name, trainable_parameters, unwrapped

log = logging.getLogger("zotune")
U_ADAPTER = "u"
Named = list[tuple[str, torch.nn.Parameter]]


class TwoSets:
    """The two parameter sets w ("w") and u ("u") and how to run the model at each."""

    def __init__(self, model, *, copies: str, include: list[str], exclude: list[str], has_adapter: bool):
        if copies == "auto":
            copies = "adapters" if has_adapter else "param_sets"
        if copies == "adapters" and not has_adapter:
            raise UserError("bilevel.copies: adapters needs model.peft (an adapter to duplicate); "
                            "use param_sets or full_copies")
        self.kind, self.model = copies, model
        w = trainable_parameters(model, include, exclude)  # freezes the rest
        self.u_model = None
        if copies == "adapters":
            w_full = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
            adapter = model.active_adapter
            model.add_adapter(U_ADAPTER, copy.deepcopy(model.peft_config[adapter]))
            params = dict(model.named_parameters())
            self.u_full, u = [], []
            for name, p in w:
                full = w_full[id(p)]
                marker = f".{adapter}."
                if marker not in full:
                    raise UserError(f"bilevel.copies: adapters: {name} is trainable but not part of the adapter; "
                                    "use param_sets")
                u_name = full.replace(marker, f".{U_ADAPTER}.")
                u_param = params[u_name]
                u.append((stable_name(u_name), u_param))
            self.adapter = adapter
            model.set_adapter(adapter)
        elif copies == "param_sets":
            full_names = {id(p): n for n, p in model.named_parameters()}
            self.full_names = [full_names[id(p)] for _, p in w]
            u = [(f"u.{n}", torch.nn.Parameter(p.detach().clone())) for n, p in w]
        else:
            self.u_model = copy.deepcopy(model)
            by_name = dict(trainable_parameters(self.u_model, include, exclude))
            u = [(f"u.{n}", by_name[n]) for n, _ in w]
        self.w, self.u = w, u
        with torch.no_grad():  # u starts where w starts
            for (_, pw), (_, pu) in zip(w, u):
                pu.copy_(pw)
        self._set_grads(w, True)
        self._set_grads(u, True)
        self._active = None

    def named(self, which: str) -> Named:
        return self.w if which == "w" else self.u

    def forward(self, which: str, inputs: dict):
        """The model's output for `inputs` with the weights of set `which`."""
        if self.kind == "adapters":
            if self._active != which:
                self.model.base_model.set_adapter(self.adapter if which == "w" else U_ADAPTER)
                self._active = which
                self.apply_requires_grad()
            return self.model(**inputs)
        if which == "w":
            return self.model(**inputs)
        if self.kind == "full_copies":
            return self.u_model(**inputs)
        return functional_call(self.model, {n: p for n, (_, p) in zip(self.full_names, self.u)}, (), inputs)

    def eval(self) -> None:
        self.model.eval()
        if self.u_model is not None:
            self.u_model.eval()

    # -- requires_grad follows LISA's active blocks (set_adapter resets it) ----------------

    trainable: set[str] | None = None  # stable names of w that train now; None: all

    def apply_requires_grad(self) -> None:
        for which in ("w", "u"):
            self._set_grads(self.named(which), True, self.trainable)

    def _set_grads(self, named: Named, value: bool, only: set[str] | None = None) -> None:
        for (name, p), (w_name, _) in zip(named, self.w):
            p.requires_grad_(value and (only is None or w_name in only))

    def active(self, which: str, names: set[str] | None) -> Named:
        """The (name, param) pairs of set `which` whose w-name is in `names` (None: all)."""
        return [(n, p) for (n, p), (wn, _) in zip(self.named(which), self.w) if names is None or wn in names]


class LayerSampler:
    """LISA: k of the model's blocks train at a time, drawn from (seed, step // interval).

    Weights outside the block list (embeddings, final norm, head) always train, as in LISA.
    """

    def __init__(self, model, w: Named, layers: int, interval: int, seed: int):
        try:
            prefix, blocks = find_blocks(unwrapped(model))
        except ValueError as e:
            raise UserError(f"bilevel.lisa: {e}") from e
        if layers > len(blocks):
            raise UserError(f"bilevel.lisa.layers: {layers} is more than the model's {len(blocks)} blocks")
        self.num_blocks, self.layers, self.interval, self.seed = len(blocks), layers, interval, seed
        self.block_of: dict[str, int | None] = {}
        for name, _ in w:
            index = None
            if name.startswith(prefix + "."):
                head = name[len(prefix) + 1:].split(".", 1)[0]
                index = int(head) if head.isdigit() else None
            self.block_of[name] = index

    def blocks_at(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, 5741, step // self.interval])
        return sorted(int(b) for b in rng.choice(self.num_blocks, self.layers, replace=False))

    def names_at(self, step: int) -> set[str]:
        chosen = set(self.blocks_at(step))
        return {n for n, b in self.block_of.items() if b is None or b in chosen}
