"""`zo_shard='fsdp'` inside a `ZOTrainer`: the weights sharded across the ranks before the
optimizer takes them, and checkpoints written and read as shards (`zotune.fsdp`).

A mixin placed before `transformers.Trainer`: each of the Trainer's checkpoint methods it overrides
falls through to the Trainer's own when the run is not sharded.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer import SCHEDULER_NAME

from zotune.errors import UserError
from zotune.fsdp import full_state_dict, load_sharded, optimizer_file, save_sharded, shard_model


class ShardedCheckpoints:
    """Needs `self.fsdp_units`: what `shard()` returned, or None for a run that is not sharded."""

    def shard(self) -> list[torch.nn.Module]:
        """Shard the model with FSDP2 over the ranks of torch.distributed; returns its FSDP units."""
        import torch.distributed as dist

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and plugin.fsdp_version != 2:
            raise UserError("accelerate's FSDP plugin is set to FSDP1, which flattens the weights: ZO shards them "
                            "with FSDP2 (fsdp_version: 2 in the accelerate config)")
        if not (dist.is_available() and dist.is_initialized()):
            raise UserError("zo.shard: fsdp (ZOConfig.zo_shard) shards the weights across the ranks of "
                            "torch.distributed: launch with torchrun or accelerate launch (README: Multi-GPU and "
                            "multi-node)")
        if self.args.load_best_model_at_end:
            raise UserError("zo.shard: fsdp saves sharded checkpoints, which load_best_model_at_end does not read")
        self.is_fsdp_enabled = False  # the Trainer's FSDP paths would save a torch optimizer's state: ours are below
        return shard_model(self.model, reshard_after_forward=plugin.reshard_after_forward if plugin else True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if self.fsdp_units is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if _internal_call:  # a checkpoint: every rank its slices, in accelerate's sharded format
            save_sharded(self.accelerator, self.model, output_dir)
            if self.args.should_save:
                self.model.config.save_pretrained(output_dir)
            return None
        weights = full_state_dict(self.model)  # every rank takes part in gathering them
        if self.args.should_save:
            self._save(output_dir, state_dict=weights)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.fsdp_units is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        return load_sharded(self.accelerator, self.model, resume_from_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.fsdp_units is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # each rank's state is of its own slices
        torch.save(self.optimizer.state_dict(), os.path.join(output_dir, optimizer_file(self.args.process_index)))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.fsdp_units is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = os.path.join(checkpoint, optimizer_file(self.args.process_index))
        if not os.path.isfile(state):
            raise UserError(f"{checkpoint}: no {optimizer_file(self.args.process_index)}; a sharded run resumes "
                            "on as many ranks as saved its optimizer state")
        self.optimizer.load_state_dict(torch.load(state, map_location=self.args.device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        return None
