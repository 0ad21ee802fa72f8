"""The `zotune` command: train, validate, ls, replay.

Commands import the heavy modules (torch, transformers) only when they need them, so
`zotune ls` and `zotune validate` stay quick. A `UserError` prints `error: ...` and exits
with status 2, without a traceback; anything else is a bug and propagates as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from zotune.errors import UserError

app = typer.Typer(
    help="Zeroth-order fine-tuning of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a bug's traceback should look like any other
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RecipeArg = Annotated[str, typer.Argument(help="A recipe file, or the name of a shipped recipe (see `zotune ls`).")]
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
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"zotune {version('zotune')}")
        except PackageNotFoundError:
            out.print("zotune (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def train(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Validate RECIPE (with overrides), then fine-tune."""
    from zotune.recipe import load_recipe, resolve

    with _user_errors():
        loaded = load_recipe(recipe, overrides or [])
        from zotune.run import train as run_train

        run_train(loaded, str(resolve(recipe)))


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check RECIPE (with overrides) without loading any weights."""
    from zotune.recipe import load_recipe

    with _user_errors():
        r = load_recipe(recipe, overrides or [])
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


@app.command(name="ls")
def list_recipes() -> None:
    """List the shipped recipes."""
    from zotune.recipe import describe, shipped_recipes

    table = Table(box=None, header_style="bold")
    table.add_column("recipe", no_wrap=True)
    table.add_column("method")
    table.add_column("task", no_wrap=True)
    table.add_column("run with", no_wrap=True)
    table.add_column("description")
    shipped = shipped_recipes()
    if not shipped:
        out.print("no shipped recipes")
        return
    for name, file in shipped.items():
        info = describe(name, file)
        table.add_row(*(escape(v) for v in info))
    out.print(table)


@app.command()
def replay(
    base: Annotated[str, typer.Argument(help="The base model the trajectory was recorded on.")],
    trajectory: Annotated[str, typer.Argument(help="The trajectory file of a ZO run.")],
    out_dir: Annotated[str, typer.Argument(help="Where to write the fine-tuned model.")],
) -> None:
    """Rebuild a fine-tuned model from BASE and the seeds and scalars of a TRAJECTORY."""
    with _user_errors():
        from zotune.replay import replay as run_replay

        run_replay(base, trajectory, out_dir)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
