"""The model card (README.md) written beside every `zotune export`: what was trained, on what
data, with which recipe, how it scored before and after, and the hash of the trajectory that
`zotune replay` rebuilds the weights from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from zotune.trajectory import FILENAME

SUMMARY = "summary.json"  # what `zotune train` printed at the end, written to the run directory


def write_model_card(out: Path, run_dir: Path, recipe_file: Path, weights: Path, kind: str) -> Path:
    """Write OUT/README.md for the `kind` exported from `weights` of the run in `run_dir`."""
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    model = recipe.get("model", {})
    base = model.get("name_or_path") or model.get("gguf_file") or model.get("gguf_package")
    data = recipe.get("data", {})
    summary = _read_json(run_dir / SUMMARY)
    trajectory = run_dir / FILENAME
    lines = [
        f"# {out.name}",
        "",
        f"The {kind} of a zotune run ({recipe.get('method', 'zo')} fine-tuning), exported from `{weights.name}`.",
        "",
        "## Base model",
        "",
        f"`{base}`" if base else "a model built from the config in the recipe (random weights)",
        "",
        "## Data",
        "",
        f"- task: {data.get('task', '?')}",
        *(f"- {split}: `{src['path']}`" + (f" (first {src['max_samples']} rows)" if src.get("max_samples") else "")
          for split in ("train", "eval", "test") if isinstance(src := data.get(split), dict) and "path" in src),
        "",
        "## Results",
        "",
        *([f"Of the whole run: this export is `{weights.name}`, an earlier state.", ""]
          if summary and weights.resolve() != run_dir.resolve() else []),
        *(_results(summary) if summary else ["Not recorded: the run did not finish (or predates summary.json)."]),
        "",
        "## Trajectory",
        "",
        *([f"`{FILENAME}` sha256 `{_sha256(trajectory)}`: with the base model, `zotune replay` rebuilds the "
           "trained weights from it bit for bit."]
          if trajectory.is_file() else ["No ZO trajectory (a first-order run)."]),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_file.read_text(encoding="utf-8").rstrip(),
        "```",
    ]
    card = ModelCard(f"---\n{_metadata(base, model).to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = out / "README.md"
    card.save(path)
    return path


def _metadata(base: str | None, model: dict) -> ModelCardData:
    tags = ["zotune", "zeroth-order"] + (["peft"] if model.get("peft") else [])
    return ModelCardData(library_name="peft" if model.get("peft") else "transformers", base_model=base, tags=tags)


def _results(summary: dict) -> list[str]:
    rows = ["| | value |", "|---|---|"]
    rows += [f"| {key} | {value} |" for key, value in summary.items() if key != "output_dir"]
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
