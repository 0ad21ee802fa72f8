"""Find a model's transformer blocks: the unit of offloading and of layer sampling.

The blocks are the longest `nn.ModuleList` whose members all share one class. No
per-architecture table: GPT-2's `transformer.h`, Llama's `model.layers`, OPT's
`model.decoder.layers` and BERT's `encoder.layer` are all found by this one rule. A
list that no forward ever calls (a leftover module) can be excluded by passing the
names of the modules a forward actually ran (`called`).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn


def find_blocks(model: nn.Module, called: Collection[str] | None = None) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of `model`'s blocks.

    Raises ValueError when the model has no ModuleList of two or more modules of one class.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if called is not None and not all(f"{name}.{i}" in called for i in range(len(module))):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of two or more same-class blocks")
    return best
