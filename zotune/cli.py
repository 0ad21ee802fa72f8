"""The `zotune` command: train, validate, ls, replay, export, plot, plan.

Commands import the heavy modules (torch, transformers) only when they need them, so
`zotune ls` stays quick, and `zotune validate` imports them only for a recipe whose form is right.
A `UserError` prints `error: ...` and exits with status 2, without a traceback; anything else is a
bug and propagates as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from zotune.errors import UserError
from zotune.precision import MASTER_WEIGHTS, SCHEDULES

app = typer.Typer(
    help="Zeroth-order fine-tuning of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug's traceback should look like any other
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RecipeArg = Annotated[str, typer.Argument(help="A recipe file, or the name of a shipped recipe (see `zotune ls`).")]
WIDE = 120  # columns from which `zotune ls` fits its table; narrower, a block per recipe
OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="Overrides such as train.max_steps=50 (values are YAML).")
]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        problems = getattr(e, "problems", None) or [str(e)]
        for line in problems:
            err.print(f"[bold red]error:[/] {escape(line)}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        from zotune import __version__

        out.print(f"zotune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the earlier run in train.output_dir and start over.")
    ] = False,
) -> None:
    """Validate RECIPE (with overrides), then fine-tune in train.output_dir, which the run owns."""
    from zotune.recipe import load_recipe, resolve

    with _user_errors():
        loaded = load_recipe(recipe, overrides or [])
        from zotune.run import train as run_train

        run_train(loaded, str(resolve(recipe)), overwrite=overwrite)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check RECIPE (with overrides), its training arguments and its data without loading any weights."""
    from zotune.recipe import load_recipe

    with _user_errors():
        r = load_recipe(recipe, overrides or [])
        from zotune.preflight import preflight  # imports transformers: only for a recipe of the right form

        notes = preflight(r, run_user_code=False).notes
    model = r.model
    if model.name_or_path is not None:
        source = model.name_or_path + (f" ({model.gguf_file})" if model.gguf_file else "")
    elif model.gguf_file is not None:
        source = model.gguf_file
    elif model.gguf_package is not None:
        source = f"package {model.gguf_package}"
    else:
        source = f"random {model.config.get('model_type', '?')}"
    out.print(f"ok: {escape(recipe)} ({r.method}, {escape(source)}, {r.data.task}, {r.train.max_steps} steps)")
    for note in notes:
        out.print(f"note: {escape(note)}")


@app.command(name="ls")
def list_recipes() -> None:
    """List the shipped recipes."""
    from zotune.recipe import describe, shipped_recipes

    shipped = shipped_recipes()
    if not shipped:
        out.print("no shipped recipes")
        return
    recipes = [describe(name, file) for name, file in shipped.items()]
    if out.width >= WIDE:
        table = Table(box=None, header_style="bold")
        for column, wrap in (("recipe", False), ("method", True), ("task", False), ("run with", False),
                             ("description", True)):
            table.add_column(column, no_wrap=not wrap)
        for info in recipes:
            table.add_row(*(escape(v) for v in info))
        out.print(table)
        return
    for info in recipes:  # a narrow terminal: one block per recipe, the description wrapped under it
        out.print(f"[bold]{escape(info.name)}[/]  {escape(info.method)} · {escape(info.task)} · "
                  f"{escape(info.command)}", soft_wrap=False)
        out.print(Padding(escape(info.description), (0, 0, 1, 2)), soft_wrap=False)


@app.command()
def replay(
    base: Annotated[str, typer.Argument(help="The base model the trajectory was recorded on.")],
    trajectory: Annotated[str, typer.Argument(help="The trajectory file of a ZO run.")],
    out_dir: Annotated[str, typer.Argument(help="Where to write the fine-tuned model (new or empty).")],
    force: Annotated[
        bool, typer.Option("--force", help="Write into OUT_DIR even if it is not empty (never the run directory).")
    ] = False,
) -> None:
    """Rebuild a fine-tuned model from BASE and the seeds and scalars of a TRAJECTORY (its checksums checked)."""
    with _user_errors():
        from zotune.replay import replay as run_replay

        run_replay(base, trajectory, out_dir, force=force)


@app.command()
def influence(
    run_dir: Annotated[str, typer.Argument(help="A finished ZO run's folder (its train.output_dir).")],
    test: Annotated[str | None, typer.Option(
        "--test", help="Attribute the loss change of these rows (a data file in the run's data format).")] = None,
    self_influence: Annotated[bool, typer.Option(
        "--self", help="Rank the training rows by self-influence, for finding mislabelled ones.")] = False,
    every: Annotated[int, typer.Option(help="--test: measure every Nth step only, each counting for N.")] = 1,
    top: Annotated[int, typer.Option(help="--test: proponents and opponents kept per test row.")] = 5,
    directions: Annotated[int, typer.Option(help="--self: random directions per checkpoint.")] = 16,
    checkpoints: Annotated[int, typer.Option(help="--self: checkpoints spread over the run.")] = 4,
    first_order: Annotated[bool, typer.Option(
        "--first-order", help="--self: also first-order TracInCP through autograd, the reference.")] = False,
    noisy: Annotated[str | None, typer.Option(
        help="--self: indices of training rows known to be noisy (JSON list or one per line).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward.")] = 16,
) -> None:
    """Which training rows moved the run's predictions (TracIn along the ZO trajectory): writes RUN_DIR/influence/."""
    with _user_errors():
        if (test is None) == (not self_influence):
            raise UserError("give one of --test FILE (attribution) or --self (self-influence)")
        from zotune.influence.run import attribution, self_influence_scores

        if test is not None:
            path = attribution(run_dir, test, every=every, top=top, batch_size=batch_size)
        else:
            path = self_influence_scores(run_dir, directions=directions, checkpoints=checkpoints,
                                         first_order=first_order, noisy=noisy, batch_size=batch_size)
        out.print(f"wrote {escape(str(path))} and its summary in {escape(str(path.parent))}")


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A `zotune train` output directory, or a checkpoint-N inside it.")],
    out_dir: Annotated[str, typer.Argument(help="Where to write the model (new or empty).")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Fold the adapter into the base weights: a plain transformers model.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into OUT_DIR even if it is not empty.")] = False,
) -> None:
    """Write a run's trained adapter (or full model) and tokenizer to OUT_DIR; --merge folds the adapter in."""
    with _user_errors():
        from zotune.export import export as run_export

        kind = run_export(run_dir, out_dir, merge=merge, force=force)
    out.print(f"wrote the {kind} of {escape(run_dir)} to {escape(out_dir)}")


@app.command()
def plot(
    run_dir: Annotated[str, typer.Argument(help="The output directory of a ZO run (it holds zo_trajectory.jsonl).")],
    png: Annotated[
        Optional[str], typer.Option("--out", help="Where to write the PNG (default RUN/zo_plot.png).")
    ] = None,
) -> None:
    """Plot a ZO run's ± losses, projected gradients and evaluation metrics over its steps (PNG)."""
    with _user_errors():
        from zotune.plot import plot_run

        path = plot_run(run_dir, png)
    out.print(f"wrote {escape(str(path))}")


@app.command()
def plan(
    recipe: Annotated[Optional[str], typer.Argument(help="A recipe file or shipped recipe; or give --model.")] = None,
    overrides: OverridesArg = None,
    model: Annotated[
        Optional[str],
        typer.Option(help="Instead of a recipe: opt-1.3b ... opt-175b, llama-3-8b, llama-3-70b, or a model directory."),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Micro-batch B (default: the recipe's, or 1).")
    ] = None,
    seq_len: Annotated[
        Optional[int], typer.Option(min=1, help="Tokens per sequence (default: the recipe's, or 2048).")
    ] = None,
    dtype: Annotated[
        Optional[Literal["float32", "bfloat16", "float16"]],
        typer.Option(help="Weight dtype (default: the recipe's, or float16)."),
    ] = None,
    offload: Annotated[
        Optional[bool],
        typer.Option("--offload/--no-offload", help="Keep the blocks on the host (default: the recipe's, or no)."),
    ] = None,
    transfer_dtype: Annotated[
        Optional[Literal["bfloat16", "float16"]], typer.Option(help="Send offloaded blocks in this dtype.")
    ] = None,
    schedule: Annotated[
        Optional[Literal[SCHEDULES]],
        typer.Option(help="ZO schedule (default: the recipe's, or dual)."),
    ] = None,
    attention: Annotated[
        Optional[Literal["sdpa", "eager", "math"]],
        typer.Option(help="eager and math (SDPA's fallback) hold the T×T scores (default: the model's)."),
    ] = None,
    master_weights: Annotated[
        Optional[Literal[MASTER_WEIGHTS]],
        typer.Option(help="fp32 master copies of 16-bit weights; auto: only with the in-place sequential and fused "
                     "schedules (default: the recipe's, or auto)."),
    ] = None,
    buffers: Annotated[int, typer.Option(min=1, help="Blocks on the compute device when offloading.")] = 3,
    compare: Annotated[
        bool, typer.Option("--compare", help="ZO beside AdamW, AdamW + gradient checkpointing, LoRA and QLoRA.")
    ] = False,
    gpu_gb: Annotated[
        Optional[float],
        typer.Option("--gpu-gb", min=0.0, help="With --compare: say which fit on a card of this many GB."),
    ] = None,
) -> None:
    """Plan the peak memory of a ZO step on the compute device and the host, without loading weights."""
    with _user_errors():
        from zotune.plan import model_config, plan_memory, recipe_config, recipe_settings

        if (recipe is None) == (model is None):
            raise UserError("give a RECIPE or --model NAME (one of them)")
        if model is not None:
            config, settings = model_config(model), dict(batch_size=1, seq_len=2048, dtype="float16")
        else:
            from zotune.recipe import load_recipe

            loaded = load_recipe(recipe, overrides or [])
            config, settings = recipe_config(loaded), recipe_settings(loaded)
        given = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, offload=offload,
                     transfer_dtype=transfer_dtype, schedule=schedule, master_weights=master_weights)
        settings.update({k: v for k, v in given.items() if v is not None})
        if gpu_gb is not None and not compare:
            raise UserError("--gpu-gb goes with --compare")
        if compare:
            from zotune.plan_compare import compare as compare_methods

            rows = compare_methods(config, batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                                   dtype=settings["dtype"], master_weights=settings.get("master_weights", "auto"),
                                   attention=attention, buffers=buffers)
            out.print(_compare_table(rows, gpu_gb))
            out.print(f"assumed: {settings['batch_size']} × {settings['seq_len']} tokens, {settings['dtype']} weights; "
                      "how each row is counted: zotune/plan_compare.py")
            return
        result = plan_memory(config, **settings, buffers=buffers, attention=attention)
    out.print(_plan_table(result))
    out.print(f"assumed: {escape(result.assumptions())}")


def _plan_table(plan) -> Table:
    from zotune.plan import GB, GIB

    table = Table(header_style="bold")
    table.add_column("")
    table.add_column("compute device", justify="right")
    table.add_column("host", justify="right")
    rows = [
        ("parameters", plan.compute_params, plan.host_params),
        ("fp32 master copy", plan.compute_master, plan.host_master),
        ("scratch (perturbed copies)", plan.compute_scratch, 0),
        ("buffers", plan.compute_buffers, 0),
        ("activations (peak)", plan.compute_activations, 0),
        ("total", plan.compute_total, plan.host_total),
    ]
    for label, compute, host in rows:
        table.add_row(label, *(f"{b / GIB:.2f} GiB ({b / GB:.2f} GB)" for b in (compute, host)))
    return table


def _compare_table(rows, gpu_gb: float | None) -> Table:
    from zotune.plan import GB
    from zotune.plan_compare import fits

    table = Table(header_style="bold")
    for column in ("method", "compute device", "host", *([f"fits {gpu_gb:g} GB"] if gpu_gb is not None else []), "how"):
        table.add_column(column, justify="left" if column in ("method", "how") else "right")
    for row in rows:
        fit = ["yes" if fits(row, gpu_gb) else "no"] if gpu_gb is not None else []
        table.add_row(row.method, f"{row.compute / GB:.2f} GB", f"{row.host / GB:.2f} GB" if row.host else "-", *fit,
                      row.note)
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
