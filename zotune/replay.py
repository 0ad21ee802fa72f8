"""`zotune replay`: rebuild fine-tuned weights from a base model and a trajectory log.

The log's checksum chain is checked as it is read (zotune.trajectory), and OUT_DIR follows
the rule export follows (zotune.outdir): never the run's folder (the one holding the
trajectory, or BASE), and empty unless --force."""

from __future__ import annotations

from pathlib import Path

from rich.progress import track

from zotune.checkpoints import exit_interrupted, finish_writing
from zotune.errors import UserError
from zotune.first_order import load_gradients
from zotune.models import load_model, trainable_parameters
from zotune.optim import ZOOptimizer
from zotune.outdir import prepare_out_dir
from zotune.recipe import load_recipe, shipped_recipes
from zotune.run import build_model
from zotune.schema import ModelSection
from zotune.settings import from_header
from zotune.trajectory import params_digest, read_trajectory


def _base_model(base: str):
    """BASE is a run directory (its recipe.yaml), a recipe, or a model directory / hub name."""
    path = Path(base)
    if (path / "recipe.yaml").is_file():
        return build_model(load_recipe(str(path / "recipe.yaml")))
    if path.suffix in (".yaml", ".yml") or base in shipped_recipes():
        return build_model(load_recipe(base))
    return load_model(ModelSection(name_or_path=base), needs_tokenizer=False)  # e.g. a drop-in run's base folder


def optimizer_from_header(header: dict, named: list) -> ZOOptimizer:
    """An optimizer over `named` (stable name, parameter) set up as the logged run's was, ready to replay."""
    opt = header["optimizer"]
    return ZOOptimizer(named, from_header(opt), lr=0.0, weight_decay=opt["weight_decay"],
                       no_decay=header["no_decay"], seed=opt["seed"])


def replaying_optimizer(header: dict, model, base: str, trajectory: str) -> ZOOptimizer:
    """An optimizer over `model`'s parameters that the log names, checked to be the weights it
    started from, set up to replay it from its first step."""
    if header["start_step"] != 0:
        raise UserError(f"{trajectory}: the log starts at step {header['start_step']}, not at the base model")
    if header["optimizer"]["schedule"] == "dual" and "master_weights" not in header["optimizer"]:
        raise UserError(f"{trajectory}: recorded by an earlier zotune, whose dual schedule moved the weights in place; "
                        "this version's dual leaves them at θ, so the replayed weights would differ in their last "
                        "bits: replay it with the zotune that wrote it")
    available = dict(trainable_parameters(model, [], []))
    missing = [n for n in header["params"] if n not in available]
    if missing:
        raise UserError(f"{base}: has no parameter {missing[0]!r} named in {trajectory} ({len(missing)} missing)")
    named = [(n, available[n]) for n in header["params"]]
    if params_digest(named) != header["init_sha256"]:
        raise UserError(f"{base}: its initial weights differ from those {trajectory} was recorded from")
    return optimizer_from_header(header, named)


def replay(base: str, trajectory: str, out_dir: str, *, force: bool = False) -> None:
    header, records = read_trajectory(trajectory)
    log = Path(trajectory).expanduser()
    protected = {log if log.is_dir() else log.parent: "the run directory itself (it holds the trajectory)"}
    if Path(base).expanduser().is_dir():
        protected.setdefault(Path(base).expanduser(), "BASE itself")
    out = prepare_out_dir(out_dir, protected, force)
    model, tokenizer = _base_model(base)
    zo = replaying_optimizer(header, model, base, trajectory)
    log_dir = log if log.is_dir() else log.parent
    for record in track(records, description="replaying"):
        zo.replay(record, load_gradients(log_dir, record))
    zo.flush()  # every weight at θ, as training saved it
    with finish_writing(f"the replayed model to {out}") as deferred:
        model.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    if deferred.requested:
        exit_interrupted(f"interrupted: the replayed model in {out} was written whole first")
