"""A `ZOTrainer` run's trajectory (`zotune.trajectory`) as a `TrainerCallback`.

The header is written once the schedule is settled and before the first step's forwards move any
weight: at the first training step (after the dual check), or at the end of a run that took no
step. Then one record per optimizer step: with the step's per-example projections
(`zotune.influence.rows`), and after the first-order gradient it names is saved (Addax), so a
record never names a file that is not there. Every rank computes the header's digest (sharded
weights are gathered for it); only the main process writes.
"""

from __future__ import annotations

from transformers import TrainerCallback

from zotune.first_order import save_gradients
from zotune.fsdp import whole
from zotune.settings import header_fields
from zotune.trajectory import TrajectoryWriter, params_digest



class TrajectoryCallback(TrainerCallback):
    """The trajectory of `trainer` (the `ZOTrainer` that adds it); `writes`: this process writes it."""

    def __init__(self, trainer, writes: bool):
        self.trainer = trainer
        self.writer = TrajectoryWriter(trainer.args.output_dir) if writes else None
        self.begun = False

    def begin(self, step: int) -> None:
        """The header of a run that starts (or resumes) at optimizer step `step`."""
        self.begun = True
        trainer, zo = self.trainer, self.trainer.zo
        if self.writer is None and trainer.fsdp_units is None:
            return
        named = [(n, p) for n, p, _ in zo.named_params()]
        digest = params_digest((n, whole(p)) for n, p in named)  # sharded: every rank joins the gathers
        if self.writer is not None:
            self.writer.start(step, {
                "params": [n for n, _ in named],
                "no_decay": zo.no_decay,
                "init_sha256": digest,
                "optimizer": {**header_fields(trainer.settings), "seed": zo.seed,
                              "weight_decay": zo.defaults["weight_decay"]},
                # a reward run's loss_plus and loss_minus are minus mean rewards (zotune plot draws rewards)
                **({"reward": True} if trainer.objective_is_reward else {}),
            })

    def on_optimizer_step(self, args, state, control, **kwargs):
        zo, record = self.trainer.zo, self.trainer.zo.last_record
        rows = self.trainer.value.rows
        if rows is not None:  # on every rank: it gathers the ranks' rows
            record.update(rows.fields())
        if self.writer is not None:
            if zo.last_first_order:  # before the record that names it
                save_gradients(args.output_dir, record["step"], zo.last_first_order)
            self.writer.append(record)
        zo.last_first_order = {}  # not held while the next step's backward allocates its own

    def on_train_end(self, args, state, control, **kwargs):
        if not self.begun:  # no step ran
            self.begin(state.global_step)
        self.trainer.flush()
        if self.writer is not None:
            self.writer.close()
