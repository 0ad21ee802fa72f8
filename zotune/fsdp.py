"""FSDP2 sharding for ZO: each rank holds a slice of every weight and gathers one unit for its forward.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to every transformer block
(`zotune.blocks`), to the input and output embeddings where they are not tied, and to the root.
A sharded weight is a DTensor cut along its first dimension; `local_shard` gives this rank's slice
and the element of the whole where it starts. `ZOOptimizer` perturbs and updates that slice with
the z of those elements (the noise is counter-based: element i of a weight draws the same number
whoever holds it), so the weights each forward gathers are the ones a single process would hold,
and the numbers equal it.

ZO runs no backward, so FSDP's gradient reduce-scatter never runs: a step exchanges the all-gathers
of its forwards and the step's losses (`ZOOptimizer._reduce_across_ranks`), nothing else.

Checkpoints are accelerate's sharded format (`accelerate.utils.save_fsdp_model` with
SHARDED_STATE_DICT: torch.distributed.checkpoint files in `pytorch_model_fsdp_0/`), so a run resumes
on any number of ranks; the ZO optimizer's state (its rules' moments, fp32 masters) is per rank, of
that rank's slices (`optimizer_file`).

`ResidentParameters` measures, at every module's forward, the parameter bytes this rank holds (its
slices plus whatever is gathered then): the claim "1/N of the weights plus one gathered unit" is
checked against it (tests/test_fsdp.py), as the offloader's residency is against its tracker.
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from zotune.blocks import find_blocks
from zotune.errors import UserError


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True) -> list[nn.Module]:
    """Shard `model` in place across the default process group's ranks; returns its FSDP units
    (the root last). `reshard_after_forward=False` keeps each unit gathered after its forward (less
    communication, all the weights resident): the memory of one process, for comparisons."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units: list[nn.Module] = list(find_blocks(model)[1])
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (input_embeddings is not None and output_embeddings is not None
            and output_embeddings.weight is input_embeddings.weight)
    if not tied:  # a tied weight is read by two modules: it stays with the root, gathered for the whole forward
        units += [m for m in (input_embeddings, output_embeddings) if m is not None]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return [*units, model]


def sharded_checkpoint_plugin():
    """The FSDP plugin object accelerate's checkpoint functions read: FSDP2, sharded state dicts."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def save_sharded(accelerator, model: nn.Module, folder: str) -> None:
    """Every rank writes its slices into `folder`/pytorch_model_fsdp_0 (a collective)."""
    from accelerate.utils import save_fsdp_model

    save_fsdp_model(sharded_checkpoint_plugin(), accelerator, model, folder)


def load_sharded(accelerator, model: nn.Module, folder: str) -> None:
    """Every rank reads its slices from `folder`/pytorch_model_fsdp_0, whatever the ranks that wrote it."""
    from accelerate.utils import load_fsdp_model

    check_metadata(Path(folder) / SHARDED_MODEL / ".metadata")
    load_fsdp_model(sharded_checkpoint_plugin(), accelerator, model, folder)


SHARDED_MODEL = "pytorch_model_fsdp_0"  # accelerate's folder name for the first model's shards
# what a checkpoint's .metadata may name: torch.distributed.checkpoint reads it with pickle.load,
# which would run any other callable it named
_METADATA_GLOBALS = {("torch", "Size"), ("pathlib", "PosixPath"), ("torch.serialization", "_get_layout"),
                     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        plain_torch = module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))
        if module.startswith("torch.distributed.checkpoint.") or plain_torch or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def check_metadata(path: Path) -> None:
    """Read a sharded checkpoint's .metadata allowing only the classes torch writes there, before
    torch.distributed.checkpoint unpickles it without limits."""
    try:
        with path.open("rb") as f:
            _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{path}: not a sharded checkpoint's metadata zotune will load ({e})") from None


def optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole weight: gathered from every rank for a sharded one (a collective), else `p` itself."""
    return p.full_tensor() if is_sharded(p) else p


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on the CPU of the main process (a collective; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(p: torch.Tensor) -> bool:
    """Whether `p` is a DTensor (without importing torch.distributed.tensor: none exists before it is)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(p, dtensor.DTensor)


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's slice of a sharded weight (a view: writing it writes the weight) and the flat
    index, in the whole weight, of its first element. FSDP2 cuts dim 0 as `torch.chunk` does."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    if placements != (Shard(0),):
        raise ValueError(f"a weight sharded as {placements}: zotune's ZO step needs FSDP2's default Shard(0) on "
                         "one mesh dimension (no shard_placement_fn, no HSDP)")
    rows, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    per_rank = -(-rows // world)
    first_row = min(rank * per_rank, rows)
    return p.to_local(), first_row * math.prod(p.shape[1:])  # from the shape: indexing a DTensor is a collective


class ResidentParameters:
    """The peak, over every module's forward (entry and exit), of the parameter bytes resident on this
    rank: the local slices of every weight (FSDP2 keeps them throughout), plus the whole weights of
    every unit gathered at that moment (registered on their modules as plain tensors, not DTensors)."""

    def __init__(self, model: nn.Module, units: list[nn.Module]):
        self.slices = sum(_nbytes(p.to_local()) for p in model.parameters() if is_sharded(p))
        others = {id(u) for u in units}
        self._slots = list({(id(m), n): (m, n) for u in units for m in _own_modules(u, others)
                            for n, _ in m.named_parameters(recurse=False)}.values())
        self.peak = 0
        self._hooks = [h for m in model.modules()
                       for h in (m.register_forward_pre_hook(self._measure), m.register_forward_hook(self._measure))]

    def gathered(self) -> int:
        weights = {id(w): w for w in (getattr(m, n) for m, n in self._slots) if not is_sharded(w)}
        return sum(_nbytes(w) for w in weights.values())

    def _measure(self, *_) -> None:
        self.peak = max(self.peak, self.slices + self.gathered())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _own_modules(unit: nn.Module, units: set[int]):
    """`unit` and its submodules, without the units nested in it (they gather on their own)."""
    yield unit
    for child in unit.children():
        if id(child) not in units:
            yield from _own_modules(child, units)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
