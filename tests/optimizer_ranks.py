"""What the raw `ZOOptimizer` trains on two ranks, and alone for the comparison (tests/test_data_parallel.py,
tests/test_fsdp.py). tests/dp_worker.py runs `ranks(task)` in the ranks of conftest's `launched` torchrun
launch, so these runs pay no launch of their own; the tests train the one-process references here too.

- `task=optimizer`: data-parallel shards of one batch (every case of DP_CASES), then sharded parameters
  (SHARDED_CASE): every weight flattened and cut into one slice per rank, the whole batch on every rank.
- `task=fsdp-optimizer`: FSDP2 (`zotune.fsdp.shard_model`) over an uneven tiny llama, each case of
  FSDP_CASES, then the control that leaves units gathered after their forward.
"""

import torch
import torch.distributed as dist
from conftest import TINY_CONFIGS, tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM

from zotune.fsdp import ResidentParameters, shard_model, whole
from zotune.optim import ZOOptimizer

STEPS = 3
ROWS = 8
SHARDS = [range(0, 3), range(3, 8)]  # uneven on purpose: 3 rows on rank 0, 5 on rank 1
# (rule, estimator, schedule, q): the rules and estimators that read losses beyond g
DP_CASES = [("sgd", "spsa", "fused", 1), ("adam", "spsa", "sequential", 2), ("conservative", "spsa", "fused", 1),
            ("sgd", "hizoo", "sequential", 1)]
SHARDED_CASE = DP_CASES[0]  # sharded parameters need spsa in place
# (rule, perturbation, schedule, q): the in-place schedules, a stateful rule, both noises
FSDP_CASES = [("sgd", "gaussian", "fused", 1), ("momentum", "rademacher", "sequential", 2)]


def batch(rows) -> dict:
    ids = (torch.arange(ROWS)[:, None] * 7 + 3 * torch.arange(12)) % 256
    ids = ids[list(rows)]
    return {"input_ids": ids, "labels": ids}


def train_rows(case, rows, *, shards=None, model=None, full=None) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of a DP_CASES case on `rows`; returns the model's parameters. `full` gathers
    sharded slices into the model before each forward (FSDP-style)."""
    rule, estimator, schedule, q = case
    model = model if model is not None else tiny_causal_lm("gpt2").eval()
    if shards is None:
        named, offsets = list(model.named_parameters()), None
    else:
        named, offsets = [(n, p) for n, (p, _) in shards.items()], {n: lo for n, (_, lo) in shards.items()}
    # gaussian: the noise these cases were set on. On gaussian4x's draws the conservative rule refuses all three
    # steps (the losses at ±ε bend down along z, so L(θ) taken as their mean sits below both candidates), and
    # the comparison needs every case to move; the noise's kind plays no part in what is compared here.
    opt = ZOOptimizer(named, lr=1e-3, eps=1e-2, num_directions=q, schedule=schedule, rule=rule, estimator=estimator,
                      shards=offsets, perturbation="gaussian")
    data = batch(rows)
    tokens = (data["labels"][:, 1:] != -100).sum().item()

    def loss_fn():
        if full is not None:
            full()
        return model(**data).loss.item()

    with torch.no_grad():
        for step in range(STEPS):
            opt.estimate(loss_fn, step, weight=tokens)
            opt.step()
    if full is not None:
        full()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_sharded(case, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Every parameter flattened and cut into `world` slices; this rank holds and trains one of
    them. The whole batch on every rank (only the parameters are sharded here)."""
    model = tiny_causal_lm("gpt2").eval()
    shards = {}
    for name, p in model.named_parameters():
        size = -(-p.numel() // world)  # the last slice is shorter when numel does not divide
        lo, hi = min(rank * size, p.numel()), min((rank + 1) * size, p.numel())
        shards[name] = (torch.nn.Parameter(p.detach().flatten()[lo:hi].clone()), lo)

    def gather():
        for name, p in model.named_parameters():
            pieces = [None] * world
            dist.all_gather_object(pieces, shards[name][0].detach())
            p.data.copy_(torch.cat(pieces).view(p.shape))

    return train_rows(case, range(ROWS), shards=shards, model=model, full=gather)


def uneven_llama():
    """A tiny llama whose MLP has 37 rows: FSDP cuts it 19 + 18 over two ranks."""
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "intermediate_size": 37})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def train_fsdp(model, case) -> None:
    """STEPS optimizer steps of a FSDP_CASES case on one batch, the same on every rank."""
    rule, kind, schedule, q = case
    opt = ZOOptimizer(list(model.named_parameters()), lr=1e-2, eps=1e-2, num_directions=q, schedule=schedule,
                      rule=rule, perturbation=kind)
    data = batch(range(4))
    with torch.no_grad():
        for step in range(STEPS):
            opt.estimate(lambda: model(**data).loss.item(), step)
            opt.step()


def ranks(task: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's (facts, weights) for `task`: the weights of each run under "RUN/CASE/NAME", what the
    run's residency tracker saw under facts[RUN/CASE]."""
    if not dist.is_initialized():  # a launch of these tasks alone
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    facts, weights = {"world": world}, {}
    if task == "optimizer":
        for i, case in enumerate(DP_CASES):
            weights |= keyed("data", i, train_rows(case, SHARDS[rank]))
        weights |= keyed("sharded", 0, train_sharded(SHARDED_CASE, rank, world))
        return facts, weights
    for i, case in enumerate(FSDP_CASES):
        model = uneven_llama()
        resident = ResidentParameters(model, shard_model(model))
        train_fsdp(model, case)
        weights |= keyed("fsdp", i, {n: whole(p).detach().clone() for n, p in model.named_parameters()})
        facts[f"fsdp/{i}"] = {"peak": resident.peak, "slices": resident.slices}
    model = uneven_llama()  # the control: units left gathered after their forward
    resident = ResidentParameters(model, shard_model(model, reshard_after_forward=False))
    train_fsdp(model, FSDP_CASES[0])
    facts["gathered/0"] = {"peak": resident.peak, "slices": resident.slices}
    return facts, weights


def keyed(run: str, case: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One run and case's weights under the names `ranks` returns them by; `run_of` takes them back out."""
    return {f"{run}/{case}/{n}": p for n, p in weights.items()}


def run_of(weights: dict[str, torch.Tensor], run: str, case: int) -> dict[str, torch.Tensor]:
    """The weights of one run and case out of what `ranks` returned."""
    prefix = f"{run}/{case}/"
    return {n.removeprefix(prefix): p for n, p in weights.items() if n.startswith(prefix)}
