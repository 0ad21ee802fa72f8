"""The ScaleBiO loop: three variables, one shared training batch per step.

With p = softmax(λ) and α the penalty (DESIGN §6), each step takes a stratified training
batch (the same rows for u and w) and a validation batch, then

    u ← u − lr_u · ∇_u α·L_train(u; p)                 L_train(θ; p) = Σ_i p_i m_i(θ)
    w ← w − lr_w · ∇_w [L_val(w) + α·L_train(w; p)]
    λ ← λ − lr_λ · α·Σ_i (m_i(w) − m_i(u)) ∂p_i/∂λ      (after `warmup_steps`; Adam or SGD)

m_i is source i's mean per-sample loss in the batch, measured at the step's starting w and
u. With `gradient: fo` the gradients come from backprop (torch AdamW or SGD); with
`gradient: zo` from SPSA through `zotune.optim.ZOOptimizer`, whose ± forwards also give
m_i as (ℓ⁺ + ℓ⁻)/2 per row at no extra cost.

This is a compact loop rather than an HF `Trainer`: a Trainer step owns one model, one
loss and one optimizer, while a ScaleBiO step updates three variables from four losses.
It keeps the Trainer's conventions where they apply: `checkpoint-N` folders,
`resume_from_checkpoint` (a path or "latest", resolved and checked by `zotune train` as for
every run: only this run's checkpoints, a damaged one named), `save_total_limit`, `logging_steps`.
The model runs in eval mode (dropout off) so that w and u are compared on one function.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from zotune.bilevel.data import BilevelData
from zotune.bilevel.sets import LayerSampler, TwoSets
from zotune.checkpoints import STAGING, clean_stale, fsync_tree, publish
from zotune.errors import UserError
from zotune.nonfinite import NonFiniteSteps
from zotune.optim import ZOOptimizer
from zotune.rundir import stamp_checkpoint
from zotune.schema import Recipe
from zotune.trainer import ZOTrainer, no_decay_names

log = logging.getLogger("zotune")
STATE_FILE = "bilevel_state.pt"


def lambda_gradient(lam: torch.Tensor, m_w: torch.Tensor, m_u: torch.Tensor, alpha: float) -> torch.Tensor:
    """α · Σ_i (m_i(w) − m_i(u)) ∂p_i/∂λ with p = softmax(λ): the softmax Jacobian in closed form."""
    p = torch.softmax(lam, 0)
    d = m_w - m_u
    return alpha * p * (d - (p * d).sum())


class ScaleBiO:
    def __init__(self, recipe: Recipe, model, data: BilevelData, *, has_adapter: bool):
        self.recipe, self.config, self.data = recipe, recipe.bilevel, data
        b, train = recipe.bilevel, recipe.train
        self.seed, self.max_steps = train.seed, train.max_steps
        self.sets = TwoSets(model, copies=b.copies, include=recipe.params.include, exclude=recipe.params.exclude,
                            has_adapter=has_adapter)
        self.sets.eval()
        self.lisa = (LayerSampler(model, self.sets.w, b.lisa.layers, b.lisa.interval, self.seed)
                     if b.lisa is not None else None)
        self.K = len(data.sources)
        self.lam = torch.nn.Parameter(torch.zeros(self.K, dtype=torch.float64))
        self.lam_opt = (torch.optim.Adam([self.lam], lr=b.lr_lambda) if b.lambda_optimizer == "adam"
                        else torch.optim.SGD([self.lam], lr=b.lr_lambda))
        self.lr = {"w": b.lr_w or train.learning_rate}
        self.lr["u"] = b.lr_u or self.lr["w"]
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.active_names: set[str] | None = None
        self._built = False
        self.step = 0
        self.nonfinite = NonFiniteSteps(recipe.zo.max_nonfinite, "lower bilevel.lr_w / lr_u, alpha or zo.eps")
        # the trainer's rule (HF's: biases and norms), on w's names; u's parameters follow their w counterparts
        self.no_decay = set(no_decay_names(self.sets.w, ZOTrainer.get_decay_parameter_names(None, model)))
        self.zo_settings = recipe.zo
        if b.gradient == "zo":
            zo = recipe.zo
            if zo.offload != "none":
                raise UserError("zo.offload: not available with method scalebio")
            if zo.objective != "loss":
                raise UserError("zo.objective: method scalebio weights per-sample losses; use `objective: loss`")
            if zo.schedule == "dual":
                log.info("zotune scalebio: zo.schedule dual runs as fused here (same numbers as sequential): "
                         "w and u share the model's modules")
                self.zo_settings = zo.model_copy(update={"schedule": "fused"})

    # -- optimizers (rebuilt when LISA switches blocks; state kept for blocks that stay) ------

    def _make_optimizer(self, which: str, names: set[str] | None):
        """The optimizer of set `which`'s parameters that train now (LISA: those of `names`)."""
        named = self.sets.active(which, names)
        no_decay = [n for (n, _), (w_name, _) in zip(named, self.sets.active("w", names)) if w_name in self.no_decay]
        lr, weight_decay = self.lr[which], self.recipe.train.weight_decay
        if self.config.gradient == "fo":
            groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay},
                      {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            if self.config.optim == "adamw":
                return torch.optim.AdamW(groups, lr=lr)
            return torch.optim.SGD(groups, lr=lr)
        return ZOOptimizer(named, self.zo_settings, lr=lr, weight_decay=weight_decay, no_decay=no_decay,
                           seed=self.seed + (0 if which == "w" else 1))

    def _ensure_optimizers(self, step: int) -> None:
        names = self.lisa.names_at(step) if self.lisa is not None else None
        if self._built and names == self.active_names:
            return
        for which in ("w", "u"):
            new = self._make_optimizer(which, names)
            old = self.opts.get(which)
            if old is not None:  # blocks that stay keep their state; switched-off blocks release it
                for _, p in self.sets.active(which, names):
                    if p in old.state and old.state[p]:
                        new.state[p] = old.state[p]
            self.opts[which] = new
        if self.config.gradient == "fo":
            for which in ("w", "u"):
                for _, p in self.sets.named(which):
                    p.grad = None
        self.active_names, self._built = names, True
        self.sets.trainable = names
        self.sets.apply_requires_grad()

    # -- one step -------------------------------------------------------------------------

    def alpha_at(self, step: int) -> float:
        b = self.config
        if b.alpha_schedule == "linear":
            return b.alpha_start + (b.alpha - b.alpha_start) * min(step / max(self.max_steps - 1, 1), 1.0)
        return b.alpha

    def source_means(self, losses: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
        ids = source_ids.to(losses.device)
        sums = torch.zeros(self.K, dtype=losses.dtype, device=losses.device).index_add(0, ids, losses)
        counts = torch.bincount(ids, minlength=self.K).to(losses.dtype)
        return sums / counts

    def train_step(self) -> dict:
        step = self.step
        self._ensure_optimizers(step)
        p = torch.softmax(self.lam.detach(), 0).float()
        alpha = self.alpha_at(step)
        batch, source_ids = self.data.train_batch(step)
        val = self.data.validation_batch(step)
        per_sample = self.data.per_sample_losses
        forward = self.sets.forward

        if self.config.gradient == "fo":
            out = {}
            for which in ("u", "w"):
                opt = self.opts[which]
                opt.zero_grad(set_to_none=True)
                means = self.source_means(per_sample(lambda x: forward(which, x), batch), source_ids)
                loss = alpha * (p * means).sum()
                val_loss = None
                if which == "w":
                    val_loss = per_sample(lambda x: forward("w", x), val).mean()
                    loss = loss + val_loss
                if not torch.isfinite(loss):
                    raise UserError(f"step {step}: the {which} loss is not finite ({loss.item()}); "
                                    "lower bilevel.lr_w / lr_u or alpha")
                loss.backward()
                opt.step()
                out[which] = (means.detach().double(), None if val_loss is None else val_loss.item())
            m_u, m_w, loss_val = out["u"][0], out["w"][0], out["w"][1]
            finite = True
        else:
            stash = {"u": [], "w": [], "val": []}

            def loss_of(which):
                def loss_fn() -> float:
                    means = self.source_means(per_sample(lambda x: forward(which, x), batch), source_ids)
                    stash[which].append(means.double())
                    value = alpha * float((p * means).sum())
                    if which == "w":
                        val_loss = per_sample(lambda x: forward("w", x), val).mean().item()
                        stash["val"].append(val_loss)
                        value += val_loss
                    return value
                return loss_fn

            records = {}
            with torch.no_grad():
                for which in ("u", "w"):
                    self.opts[which].estimate(loss_of(which), step)
                    records[which] = self.opts[which].step()
            m_u = torch.stack(stash["u"]).mean(0)  # (ℓ⁺ + ℓ⁻)/2, per source
            m_w = torch.stack(stash["w"]).mean(0)
            loss_val = float(np.mean(stash["val"]))
            finite = all(r["g"] is not None for r in records.values())
            self.nonfinite.count(step, finite)

        grad_norm = 0.0
        if step >= self.config.warmup_steps and finite and torch.isfinite(m_w - m_u).all():
            grad = lambda_gradient(self.lam.detach(), m_w, m_u, alpha)
            grad_norm = float(grad.norm())
            clip = self.config.lambda_grad_clip
            if clip is not None and grad_norm > clip:
                grad = grad * (clip / grad_norm)
            self.lam.grad = grad
            self.lam_opt.step()
            self.lam_opt.zero_grad(set_to_none=True)
        self.step += 1
        weights = torch.softmax(self.lam.detach(), 0)
        return {
            "step": self.step,
            "weights": dict(zip(self.data.names, (round(float(v), 6) for v in weights))),
            "alpha": alpha,
            "loss_val": loss_val,
            "loss_train_w": float((p.double() * m_w).sum()),
            "loss_train_u": float((p.double() * m_u).sum()),
            "m_w": [round(float(v), 5) for v in m_w],
            "m_u": [round(float(v), 5) for v in m_u],
            "lambda_grad_norm": grad_norm,
            **({"lisa_blocks": self.lisa.blocks_at(step)} if self.lisa is not None else {}),
        }

    @property
    def weights(self) -> np.ndarray:
        return torch.softmax(self.lam.detach(), 0).numpy()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        def by_name(which):
            opt = self.opts[which]
            return {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                    for n, p in self.sets.active(which, self.active_names) if p in opt.state}

        return {
            "step": self.step,
            "lambda": self.lam.detach().clone(),
            "lambda_optimizer": self.lam_opt.state_dict(),
            "w": {n: p.detach().clone() for n, p in self.sets.w},
            "u": {n: p.detach().clone() for n, p in self.sets.u},
            "optimizer_w": by_name("w"),
            "optimizer_u": by_name("u"),
            "nonfinite_in_a_row": self.nonfinite.in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lam.copy_(state["lambda"])
            for which in ("w", "u"):
                saved = state[which]
                for n, p in self.sets.named(which):
                    p.copy_(saved[n])
        self.lam_opt.load_state_dict(state["lambda_optimizer"])
        self.step = state["step"]
        self.nonfinite.in_a_row = state.get("nonfinite_in_a_row", 0)
        self._built = False
        self.opts = {}
        self._ensure_optimizers(self.step)
        for which in ("w", "u"):
            opt, saved = self.opts[which], state[f"optimizer_{which}"]
            for n, p in self.sets.active(which, self.active_names):
                if n in saved:
                    opt.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in saved[n].items()}


# ---------------------------------------------------------------- the run


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and
             (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save(run: ScaleBiO, out: Path, limit: int | None) -> None:
    """Write checkpoint-N whole or not at all: into a staging folder, fsynced, then renamed into place
    (zotune.checkpoints, as the trainer's checkpoints are)."""
    staging = out / f"{STAGING}{run.step}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(run.state_dict(), staging / STATE_FILE)
    stamp_checkpoint(out, staging)  # the run's identity: resume takes only this run's checkpoints
    fsync_tree(str(staging))
    publish(str(staging), str(out / f"checkpoint-{run.step}"))
    if limit is not None:
        for old in _checkpoints(out)[:-limit]:
            shutil.rmtree(old)


def _evaluate(run: ScaleBiO, batch_size: int) -> float | None:
    data = run.data
    if data.eval is None or data.classes is None:
        return None
    correct = []
    with torch.no_grad():
        for batch in data.eval_batches(batch_size):
            correct.append(data.predictions_correct(lambda x: run.sets.forward("w", x), batch))
    return float(torch.cat(correct).mean())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_weights(history: list[dict], names: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("zotune scalebio: matplotlib is not installed; no %s (pip install matplotlib)", path.name)
        return False
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.plot(steps, [h["weights"][name] for h in history], label=name)
    ax.axhline(1 / len(names), color="grey", linestyle=":", linewidth=1, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("mixture weight p = softmax(λ)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_scalebio(recipe: Recipe, model, tokenizer, *, checkpoint: Path | None = None, console=None) -> dict:
    """Train a ScaleBiO recipe end to end; returns the summary. `checkpoint`: the one to continue from,
    as `zotune train` resolves and checks `train.resume_from_checkpoint` (this run's, and whole)."""
    train, b = recipe.train, recipe.bilevel
    out = Path(train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(str(out))  # what a crash mid-save left
    data = BilevelData(recipe, tokenizer, model)
    run = ScaleBiO(recipe, model, data, has_adapter=recipe.model.peft is not None)
    history_file = out / "mixture_weights.jsonl"

    if checkpoint is not None:
        run.load_state_dict(torch.load(checkpoint / STATE_FILE, weights_only=True))
        kept = [h for h in _read_jsonl(history_file) if h["step"] <= run.step]
        history_file.write_text("".join(json.dumps(h) + "\n" for h in kept))
        log.info("zotune scalebio: resumed from %s at step %d", checkpoint, run.step)
    else:
        uniform = dict(zip(data.names, [round(1 / run.K, 6)] * run.K))
        history_file.write_text(json.dumps({"step": 0, "weights": uniform}) + "\n")

    before = _evaluate(run, train.per_device_eval_batch_size) if train.evaluate_before and run.step == 0 else None
    start, first_step = time.perf_counter(), run.step
    last = {}
    with open(history_file, "a", encoding="utf-8") as history, Progress(
        TextColumn("[bold]scalebio[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=console, transient=False, disable=console is None,
    ) as progress:
        task = progress.add_task("", total=train.max_steps, completed=run.step)
        while run.step < train.max_steps:
            last = run.train_step()
            history.write(json.dumps(last) + "\n")
            history.flush()
            top = max(last["weights"], key=last["weights"].get)
            progress.update(task, advance=1,
                            description=f"val {last['loss_val']:.3f} · top {top} {last['weights'][top]:.3f}")
            if run.step % train.logging_steps == 0 or run.step == train.max_steps:
                shown = " ".join(f"{n} {v:.3f}" for n, v in last["weights"].items())
                log.info("step %d: loss_val %.4f train_w %.4f train_u %.4f | p: %s", run.step, last["loss_val"],
                         last["loss_train_w"], last["loss_train_u"], shown)
            if train.save_strategy == "steps" and (run.step % train.save_steps == 0 or run.step == train.max_steps):
                _save(run, out, train.save_total_limit)
    elapsed = time.perf_counter() - start
    after = _evaluate(run, train.per_device_eval_batch_size)

    weights = run.weights
    ranking = sorted(data.names, key=lambda n: -weights[data.names.index(n)])
    final = {
        "step": run.step,
        "weights": dict(zip(data.names, (float(v) for v in weights))),
        "ranking": ranking,
        "lambda": [float(v) for v in run.lam.detach()],
        "gradient": b.gradient,
        "copies": run.sets.kind,
    }
    (out / "mixture_weights_final.json").write_text(json.dumps(final, indent=2) + "\n")
    history = _read_jsonl(history_file)
    plotted = b.plot and plot_weights(history, data.names, out / "mixture_weights.png",
                                      f"ScaleBiO ({b.gradient}) mixture weights")
    counts = data.write_mixture(out / "mixture.jsonl", weights, b.mixture_size, run.seed)
    data.write_mixture(out / "mixture_uniform.jsonl", np.full(run.K, 1 / run.K), b.mixture_size, run.seed)
    if run.sets.kind == "adapters":
        model.save_pretrained(str(out), selected_adapters=[run.sets.adapter])
    else:
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    steps_run = run.step - first_step
    summary = {
        "method": f"scalebio ({b.gradient}, {run.sets.kind})",
        "steps": run.step,
        "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(steps_run, 1), 3),
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "top_source": ranking[0],
        "weights": " ".join(f"{n}={v:.3f}" for n, v in final["weights"].items()),
        "mixture_rows": " ".join(f"{n}={c}" for n, c in counts.items()),
        "plot": str(out / "mixture_weights.png") if plotted else None,
        "output_dir": str(out),
    }
    if math.isfinite(last.get("loss_val", math.nan) or math.nan):
        summary["last_loss_val"] = last["loss_val"]
    return summary
