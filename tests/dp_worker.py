"""ZOTrainer runs as `torchrun` launches them (tests/test_data_parallel.py, tests/test_fsdp.py): ranks
share nothing but the process group. Each RUN, one after the other in the same processes (one launch
for several runs), writes the trained weights and what each rank saw to OUT_DIR/NAME.

    torchrun --nproc_per_node N tests/dp_worker.py OUT_DIR RUN [RUN ...]
    RUN: NAME:batch=B[,shard=fsdp][,schedule=S][,save_steps=K][,resume=CHECKPOINT][,task=reward]
         NAME:task=optimizer | NAME:task=fsdp-optimizer

`task=reward` trains tests/helpers.py's reward run (`reward_run`) instead: the ranks share out its
population. `task=optimizer` and `task=fsdp-optimizer` train the raw ZOOptimizer (tests/optimizer_ranks.py).
"""

import json
import os
import sys

import torch
from conftest import tiny_causal_lm  # (this script's folder is on sys.path)
from datasets import Dataset
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from optimizer_ranks import ranks as optimizer_ranks

from zotune import ZOConfig, ZOTrainer
from zotune.fsdp import ResidentParameters, whole


def rows(n: int = 24):
    """Counting sequences of uneven lengths: the ranks' shards hold different numbers of tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 6 + int(torch.randint(0, 10, (1,), generator=g))
        ids = ((int(torch.randint(0, 256, (1,), generator=g)) + 3 * torch.arange(length)) % 256).tolist()
        out.append({"input_ids": ids})
    return Dataset.from_list(out)


def collate(batch):
    """Right padding, -100 on padded labels."""
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), 258)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# a run's fields, with their types and defaults
FIELDS = {"batch": (int, None), "shard": (str, "none"), "schedule": (str, "dual"), "save_steps": (int, None),
          "resume": (str, None), "task": (str, "lm")}
OPTIMIZER_TASKS = ("optimizer", "fsdp-optimizer")  # the raw optimizer's runs: no Trainer, no batch size


def parse_run(spec: str) -> tuple[str, dict]:
    name, _, fields = spec.partition(":")
    given = dict(field.split("=", 1) for field in fields.split(",") if field)
    unknown = set(given) - set(FIELDS)
    if unknown or ("batch" not in given and given.get("task") not in OPTIMIZER_TASKS):
        raise SystemExit(f"{spec}: unknown fields {sorted(unknown)} or no batch")
    return name, {key: kind(given[key]) if key in given else default for key, (kind, default) in FIELDS.items()}


def main(out: str, batch: int, *, shard: str, schedule: str, save_steps: int | None, resume: str | None,
         task: str) -> None:
    if task in OPTIMIZER_TASKS:
        facts, weights = optimizer_ranks(task)
        save(out, facts, weights)
        return
    if task == "reward":
        from helpers import reward_run

        model, trainer = reward_run(out, schedule, per_device_train_batch_size=batch)
        trainer.train()
        write(out, model, trainer, resident=None)
        return
    model = tiny_causal_lm("llama")
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = ZOConfig(output_dir=out, max_steps=4, per_device_train_batch_size=batch, learning_rate=1e-2, zo_eps=1e-2,
                    zo_schedule=schedule, zo_shard=shard, lr_scheduler_type="constant", logging_steps=1,
                    report_to="none", use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
                    **saving)
    trainer = ZOTrainer(model=model, args=args, train_dataset=rows(), data_collator=collate)
    resident = ResidentParameters(model, trainer.fsdp_units) if trainer.fsdp_units else None
    trainer.train(resume_from_checkpoint=resume)
    write(out, model, trainer, resident)


def write(out: str, model, trainer, resident) -> None:
    """What this rank saw, and the trained weights (whole: a sharded run's gathered on every rank)."""
    comm = [log["comm_bytes_per_step"] for log in trainer.state.log_history if "comm_bytes_per_step" in log]
    facts = {"ddp": isinstance(trainer.model_wrapped, DistributedDataParallel), "comm_bytes": comm,
             "world": int(os.environ.get("WORLD_SIZE", 1)), "g": trainer.zo.last_record["g"],
             "rows": {key: trainer.zo.last_record.get(key) for key in ("row_index", "row_weight", "row_g")},
             "resident": {"peak": resident.peak, "slices": resident.slices} if resident else None}
    save(out, facts, {n: whole(p) for n, p in model.named_parameters()})  # sharded: gathered, on every rank


def save(out: str, facts: dict, weights: dict) -> None:
    """This rank's facts and weights, as tests/helpers.py's `ranks_of` reads them."""
    rank = int(os.environ.get("RANK", 0))
    (open(f"{out}/rank{rank}.json", "w")).write(json.dumps(facts))
    save_file({n: p.detach().contiguous() for n, p in weights.items()}, f"{out}/rank{rank}.safetensors")


if __name__ == "__main__":
    for name, fields in map(parse_run, sys.argv[2:]):
        os.makedirs(f"{sys.argv[1]}/{name}", exist_ok=True)
        main(f"{sys.argv[1]}/{name}", **fields)
