"""ZO2-style offloading of transformer blocks (DESIGN §4), for any model `find_blocks` understands.

The blocks' parameters live on the offload device (the CPU; pinned memory when the
compute device is CUDA). Between forwards a block parameter's `.data` *is* its home
tensor, so saving, evaluation hooks and the optimizer's update passes all see the
true weights. Around each block's forward:

- pre-hook: the block is on the compute device (uploaded now, or prefetched while the
  previous block ran); the upload of the next block starts;
- forward: runs on the uploaded copies (the dual engine perturbs them in place);
- hook: the trainable parameters are written back home and the copies released.

The fp32 master copies that the optimizer keeps for 16-bit trainable weights, and the state
an estimator's directions read (a sparse mask, a Hessian estimate), travel with their block
the same way (`state_of`, `travelling_keys`). So at most three blocks are on the compute device at once:
the one being written back, the one running and the one being prefetched. Embeddings, final norm and head stay
resident. `tracker` counts the parameter bytes held on the compute device.

CUDA: uploads and write-backs run on one side stream, ordered against the compute
stream by events only (no host synchronisation). A copy is allocated on the side
stream and used on the compute stream, so it is `record_stream`-ed there: the caching
allocator then cannot hand its memory to a later upload before the compute stream is
done with it. On the CPU both devices are the CPU and the copies are real copies.

`transfer_dtype` sends blocks in 16 bits (half the transfer), cast back to the weights'
dtype on the compute device. The home copy keeps full precision, and the copies that
ran are not written back: the out-of-place dual schedule never changes them, and the update
passes work on the home weights.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from zotune.blocks import find_blocks


@dataclass
class ResidencyTracker:
    """Bytes of parameters held on the compute device: resident parts plus uploaded blocks."""

    resident: int = 0
    uploaded: int = 0
    peak: int = 0
    uploads: int = 0

    def add(self, nbytes: int) -> None:
        self.uploaded += nbytes
        self.uploads += 1
        self.peak = max(self.peak, self.resident + self.uploaded)

    def remove(self, nbytes: int) -> None:
        self.uploaded -= nbytes


class _Block:
    """One block's parameters: their home tensors and, while uploaded, the compute copies."""

    def __init__(self, module: nn.Module, home_device: torch.device, pin: bool):
        self.module = module
        self.params = list(module.parameters())
        self.homes = []
        for p in self.params:
            home = p.data.to(home_device)
            p.data = home.pin_memory() if pin else home
            self.homes.append(p.data)
        self.copies: list[torch.Tensor] | None = None
        self.travelling: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []  # (optimizer state, key, home, copy)
        self.ready: torch.cuda.Event | None = None

    def nbytes(self, state_homes: list[tuple[dict, str, torch.Tensor]]) -> int:
        return sum(t.numel() * t.element_size() for t in self.homes + [home for _, _, home in state_homes])


class BlockOffloader:
    """Keeps `model`'s blocks on `offload_device` and streams them to `compute_device` one at a time."""

    def __init__(self, model: nn.Module, compute_device, *, offload_device="cpu", transfer_dtype=None):
        self.compute = torch.device(compute_device)
        self.cuda = self.compute.type == "cuda"
        self.transfer_dtype = transfer_dtype
        self.state_of = None  # param -> its optimizer state, whose `travelling_keys` travel with the block
        self.travelling_keys: tuple[str, ...] = ("master",)
        self.blocks_name, blocks = find_blocks(model)
        block_params = {id(p) for b in blocks for p in b.parameters()}
        resident = 0
        for p in model.parameters():  # resident parts go to the compute device, blocks stay home
            if id(p) not in block_params:
                p.data = p.data.to(self.compute)
                resident += p.numel() * p.element_size()
        for b in model.buffers():
            b.data = b.data.to(self.compute)
        if transfer_dtype is not None and any(p.dtype.itemsize <= 2 and p.is_floating_point()
                                              for p in blocks.parameters()):
            raise ValueError("offload transfer_dtype: the weights are already 16-bit")
        self.blocks = [_Block(b, torch.device(offload_device), self.cuda) for b in blocks]
        self.tracker = ResidencyTracker(resident=resident, peak=resident)
        self.stream = torch.cuda.Stream(self.compute) if self.cuda else None
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.module.register_forward_pre_hook(self._before(i)))
            self._handles.append(block.module.register_forward_hook(self._after(i)))

    def block_bytes(self) -> int:
        """Compute-device bytes of the largest block, with the optimizer state that travels with it."""
        return max(b.nbytes(self._state_homes(b)) for b in self.blocks)

    def _state_homes(self, block: _Block) -> list[tuple[dict, str, torch.Tensor]]:
        """(optimizer state, key, home tensor) of the state the forward reads: the fp32 masters of
        16-bit weights and whatever the estimator's directions use (`travelling_keys`)."""
        states = [self.state_of(p) for p in block.params if p.requires_grad] if self.state_of else []
        return [(state, key, state[key]) for state in states for key in self.travelling_keys if key in state]

    def wait(self) -> None:
        """Block the host until every write-back has landed: call before the host reads the weights."""
        if self.cuda:
            self.stream.synchronize()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # -- hooks -----------------------------------------------------------------------------

    def _before(self, i: int):
        def hook(module, args):
            block = self.blocks[i]
            if block.copies is None:
                self._upload(block)
            if self.cuda:
                torch.cuda.current_stream(self.compute).wait_event(block.ready)
                for copy in block.copies + [copy for _, _, _, copy in block.travelling]:
                    copy.record_stream(torch.cuda.current_stream(self.compute))
            for p, copy in zip(block.params, block.copies):
                p.data = copy
            for state, key, _, copy in block.travelling:
                state[key] = copy
            if i + 1 < len(self.blocks) and self.blocks[i + 1].copies is None:
                self._upload(self.blocks[i + 1])  # prefetch: overlaps with block i's compute on CUDA

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._write_back(self.blocks[i])

        return hook

    # -- transfers -------------------------------------------------------------------------

    def _upload(self, block: _Block) -> None:
        def copy(home):
            if self.transfer_dtype is None or not home.is_floating_point():
                return home.to(self.compute, non_blocking=self.cuda, copy=True)
            # sent in 16 bits, computed in the weights' own dtype
            return home.to(self.compute, dtype=self.transfer_dtype, non_blocking=self.cuda).to(home.dtype)

        homes = self._state_homes(block)
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            block.copies = [copy(h) for h in block.homes]
            block.travelling = [(state, key, home, copy(home)) for state, key, home in homes]
            if self.cuda:
                block.ready = torch.cuda.Event()
                block.ready.record(self.stream)
        self.tracker.add(block.nbytes(homes))

    def _write_back(self, block: _Block) -> None:
        trainable = [(p, home) for p, home in zip(block.params, block.homes) if p.requires_grad]
        travelled = [(state[key], home) for state, key, home, _ in block.travelling]
        if self.transfer_dtype is None:
            if self.cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.compute))
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(done)
                    for data, home in [(p.data, home) for p, home in trainable] + travelled:
                        home.copy_(data, non_blocking=True)
            else:
                for data, home in [(p.data, home) for p, home in trainable] + travelled:
                    home.copy_(data)
        for p, home in zip(block.params, block.homes):
            p.data = home
        for state, key, home, _ in block.travelling:
            state[key] = home
        self.tracker.remove(block.nbytes([(state, key, home) for state, key, home, _ in block.travelling]))
        block.copies, block.travelling, block.ready = None, [], None
