"""The ZO settings model (`zotune.settings`): one definition reaches the recipe, `ZOConfig`, the
trajectory header, replay and the bilevel mode; trajectories written before it still replay."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

from zotune.replay import replay
from zotune.trajectory import params_digest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LEGACY = Path(__file__).resolve().parent / "data" / "trajectories_v0"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")


def base_recipe(tmp_path: Path) -> Path:
    """The recipe whose model the committed trajectories were recorded from (tiny llama, train.seed 0)."""
    recipe = {
        "model": {"config": tiny_config("llama")},
        "data": {"task": "classification", "train": {"path": str(DATA / "rotten_tomatoes/train.jsonl")},
                 "verbalizer": {"0": "n", "1": "y"}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@needs_data
@pytest.mark.parametrize("case", ["dual_lazy", "fused_momentum"])
def test_a_trajectory_written_before_the_settings_model_replays_to_the_same_weights(tmp_path, case):
    expected = json.loads((LEGACY / "expected.json").read_text())[case]
    replay(str(base_recipe(tmp_path)), str(LEGACY / f"{case}.jsonl"), str(tmp_path / "out"))
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert params_digest(sorted(weights.items())) == expected["weights_sha256"]
