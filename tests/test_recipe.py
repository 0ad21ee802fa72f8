"""Recipe loading: validation messages with file and line, overrides, local file checks."""

import pytest
from helpers import CONFIG, TINY, line_of

from zotune import recipe as recipe_mod
from zotune.errors import UserError
from zotune.recipe import RecipeError, dump_recipe, load_recipe, resolve, shipped_recipes
from zotune.schema import Recipe

@pytest.fixture
def write(tmp_path, monkeypatch):
    """write(text) -> the recipe file name, in a cwd that holds the data files it names."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / name).write_text('{"text": "good", "label": 1}\n')

    def write(text: str, name: str = "tiny.yaml") -> str:
        (tmp_path / name).write_text(text)
        return name

    return write


def problems(name: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(name, overrides)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def test_valid_recipe_loads(write):
    r = load_recipe(write(TINY))
    assert isinstance(r, Recipe)
    assert r.method == "zo" and r.model.config["model_type"] == "llama"
    assert r.data.train.max_samples == 64 and r.data.eval.split == "train"
    assert r.zo.eps == 0.001 and r.train.max_steps == 5
    assert r.params.include == ["layers"]


@pytest.mark.parametrize(
    "after, typo, path, suggestion",
    [
        (None, "methd: zo", "methd", "did you mean 'method'?"),
        ("model:", "  dtyp: float32", "model.dtyp", "did you mean 'dtype'?"),
        ("data:", "  max_lenght: 64", "data.max_lenght", "did you mean 'max_length'?"),
        ("  train:", "    max_sample: 64", "data.train.max_sample", "did you mean 'max_samples'?"),
        ("params:", "  exclud: [head]", "params.exclud", "did you mean 'exclude'?"),
        ("zo:", "  num_direction: 2", "zo.num_direction", "did you mean 'num_directions'?"),
        ("train:", "  learning_rat: 0.1", "train.learning_rat", "did you mean 'learning_rate'?"),
    ],
)
def test_unknown_key_names_file_line_and_suggestion(write, after, typo, path, suggestion):
    lines = TINY.splitlines()
    at = lines.index(after) + 1 if after else lines.index("method: zo")
    lines.insert(at, typo)
    text = "\n".join(lines) + "\n"
    assert problems(write(text)) == [f"tiny.yaml:{at + 1}: {path}: unknown key; {suggestion}"]


def test_unknown_key_without_close_match_lists_valid_keys(write):
    text = TINY.replace("  eps: 1e-3", "  colour: blue\n  eps: 1e-3")
    [p] = problems(write(text))
    assert p.startswith(f"tiny.yaml:{line_of(text, 'colour')}: zo.colour: unknown key; "
                        "valid keys: rule, estimator, eps, num_directions")


def test_key_in_the_wrong_section_says_where_it_belongs(write):
    text = TINY.replace("  eps: 1e-3", "  learning_rate: 0.1\n  eps: 1e-3")
    [p] = problems(write(text))
    assert p == f"tiny.yaml:{line_of(text, 'learning_rate: 0.1')}: zo.learning_rate: unknown key; " \
                "it belongs in the train section (train.learning_rate)"


def test_wrong_type_names_key_line_and_expected_type(write):
    text = TINY.replace("max_steps: 5", "max_steps: five")
    assert problems(write(text)) == [
        f"tiny.yaml:{line_of(text, 'max_steps')}: train.max_steps: expected an integer, got 'five'"
    ]


def test_section_of_wrong_type(write):
    text = TINY.replace("params:\n  include: [layers]", "params: [layers]")
    assert problems(write(text)) == [
        f"tiny.yaml:{line_of(text, 'params')}: params: expected a mapping of keys, got ['layers']"
    ]


def test_missing_required_key_names_its_section(write):
    text = TINY.replace("  task: classification\n", "")
    assert problems(write(text)) == [f"tiny.yaml:{line_of(text, 'data:')}: data.task: required key is missing"]


def test_missing_section(write):
    start, end = TINY.index("model:"), TINY.index("data:")
    assert problems(write(TINY[:start] + TINY[end:])) == ["tiny.yaml:1: model: required key is missing"]


def test_model_validator_error_names_the_model_section(write):
    text = TINY.replace("model:\n", "model:\n  name_or_path: gpt2\n")
    [p] = problems(write(text))
    assert p.startswith(f"tiny.yaml:{line_of(text, 'model:')}: model: give only one model source")


@pytest.mark.parametrize("value, hint", [("twice", ""), ("sequental", "; did you mean 'sequential'?")])
def test_invalid_literal_lists_allowed_values(write, value, hint):
    text = TINY.replace("schedule: sequential", f"schedule: {value}")
    assert problems(write(text)) == [
        f"tiny.yaml:{line_of(text, 'schedule')}: zo.schedule: '{value}' is not one of: dual, sequential, fused{hint}"
    ]


def test_all_errors_are_reported_in_line_order(write):
    text = (
        TINY.replace("method: zo", "method: zeroth")
        .replace("    max_samples: 64", "    max_samples: -1")
        .replace("  schedule: sequential", "  schedule: twice\n  bogus: 1")
        .replace("learning_rate: 0.001", "learning_rate: fast")
    )
    found = problems(write(text))
    assert [p.split(": ")[1] for p in found] == [
        "method", "data.train.max_samples", "zo.schedule", "zo.bogus", "train.learning_rate"
    ]
    assert [int(p.split(":")[1]) for p in found] == sorted(int(p.split(":")[1]) for p in found)
    assert "greater than 0" in found[1] and "expected a number, got 'fast'" in found[4]


def test_duplicate_key_and_yaml_syntax_errors(write):
    text = TINY.replace("  max_steps: 5", "  max_steps: 5\n  max_steps: 6")
    first, second = line_of(text, "max_steps: 5"), line_of(text, "max_steps: 6")
    assert problems(write(text)) == [f"tiny.yaml:{second}: train.max_steps: duplicate key (first at line {first})"]
    text = TINY.replace("  schedule: sequential", "  schedule: [sequential")
    [p] = problems(write(text))
    assert p.startswith("tiny.yaml:") and "invalid YAML" in p
    assert problems(write("- just\n- a list\n"))[0].startswith("tiny.yaml:1: a recipe is a YAML mapping")


def test_overrides_apply_with_yaml_typing(write):
    r = load_recipe(
        write(TINY),
        [
            "train.max_steps=50",
            "zo.eps=1e-4",
            "train.evaluate_before=false",
            "params.exclude=[head, embed]",
            "data.eval=null",
            "data.verbalizer={0: ' bad', 1: ' good'}",
            "train.report_to=[tensorboard]",
        ],
    )
    assert r.train.max_steps == 50
    assert isinstance(r.zo.eps, float) and r.zo.eps == 1e-4
    assert r.train.evaluate_before is False
    assert r.params.exclude == ["head", "embed"]
    assert r.data.eval is None
    assert r.data.verbalizer == {"0": " bad", "1": " good"}
    assert r.train.report_to == ["tensorboard"]


def test_override_fixes_a_bad_file_value_and_creates_sections(write):
    text = TINY.replace("schedule: sequential", "schedule: twice")
    start, end = TINY.index("params:"), TINY.index("zo:")
    r = load_recipe(write(text[:start] + text[end:]), ["zo.schedule=fused", "params.include=[mlp]"])
    assert r.zo.schedule == "fused" and r.params.include == ["mlp"]


def test_bad_overrides_are_all_reported(write):
    overrides = ["train.max_steps=abc", "nokey", "train.seed=[1", "method.x=1", "train.max_stepz=5"]
    assert problems(write(TINY), overrides) == [
        "<override train.max_steps=abc>: train.max_steps: expected an integer, got 'abc'",
        "<override nokey>: expected KEY=VALUE with a dotted key, e.g. train.max_steps=50",
        "<override train.seed=[1>: train.seed: the value is not valid YAML "
        "(expected ',' or ']', but got '<stream end>')",
        "<override method.x=1>: method is 'zo', not a section with keys",
        "<override train.max_stepz=5>: train.max_stepz: unknown key; did you mean 'max_steps'?",
    ]


def test_floats_in_exponent_form(write):
    text = TINY.replace("learning_rate: 0.001", "learning_rate: 5E-5").replace(
        "intermediate_size: 64}", "intermediate_size: 64, rms_norm_eps: 1e-6, rope_theta: 1e4}"
    )
    r = load_recipe(write(text), ["train.weight_decay=1e-2"])
    assert r.zo.eps == 1e-3 and r.train.learning_rate == 5e-5 and r.train.weight_decay == 0.01
    # model.config is passed on untyped, so YAML itself must read these as floats
    assert r.model.config["rms_norm_eps"] == 1e-6 and isinstance(r.model.config["rope_theta"], float)


def test_unquoted_integer_keys_become_strings(write):
    r = load_recipe(write(TINY.replace('{"0": " terrible", "1": " great"}', '{0: " terrible", 1: " great"}')))
    assert r.data.verbalizer == {"0": " terrible", "1": " great"}


def test_missing_local_data_file_names_the_key_and_line(write):
    text = TINY.replace("path: train.jsonl", "path: data/nope.jsonl")
    [p] = problems(write(text))
    assert p.startswith(f"tiny.yaml:{line_of(text, 'nope')}: data.train.path: data file not found: data/nope.jsonl")


@pytest.mark.parametrize(
    "replace, with_",
    [
        ("path: train.jsonl", "path: data/nope.jsonl\n    fallback: rotten_tomatoes"),  # has a fallback
        ("path: train.jsonl", "path: rotten_tomatoes"),  # a hub name
    ],
)
def test_data_paths_that_are_not_checked(write, replace, with_):
    load_recipe(write(TINY.replace(replace, with_)))


@pytest.mark.parametrize(
    "source, key",
    [("gguf_file: ./missing.gguf", "model.gguf_file"), ("name_or_path: ./no/such/model", "model.name_or_path")],
)
def test_missing_local_model_files(write, source, key):
    text = TINY.replace(CONFIG, f"  {source}\n")
    [p] = problems(write(text))
    assert p.startswith(f"tiny.yaml:{line_of(text, source)}: {key}: ") and "not found" in p


def test_gguf_file_relative_to_a_hub_model_is_not_checked(write):
    text = TINY.replace(CONFIG, "  name_or_path: org/model-GGUF\n  gguf_file: model.gguf\n")
    assert load_recipe(write(text)).model.gguf_file == "model.gguf"


def test_dump_recipe_round_trips(write, tmp_path):
    r = load_recipe(write(TINY), ["train.max_steps=7"])
    dumped = dump_recipe(r, source="tiny.yaml", overrides=["train.max_steps=7"])
    assert dumped.startswith("# resolved from tiny.yaml with train.max_steps=7\n")
    assert load_recipe(write(dumped, "dumped.yaml")) == r


def test_resolve_files_and_shipped_names(write, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "quickstart.yaml").write_text(TINY)
    monkeypatch.setattr(recipe_mod, "shipped_recipes", lambda: {"quickstart": shipped / "quickstart.yaml"})
    assert resolve("quickstart") == shipped / "quickstart.yaml"
    assert resolve("quickstart.yaml") == shipped / "quickstart.yaml"
    (tmp_path / "quickstart.yaml").write_text(TINY)
    assert str(resolve("quickstart.yaml")) == "quickstart.yaml"  # an existing file wins
    suggestion = r"no recipe 'quikstart'.*did you mean 'quickstart'\?\nshipped recipes: quickstart"
    with pytest.raises(UserError, match=suggestion):
        resolve("quikstart")


def test_recipes_are_shipped():
    assert shipped_recipes(), "no recipes in zotune.recipes (zotune/recipes/)"


@pytest.mark.parametrize("name", list(shipped_recipes()))
def test_shipped_recipe_validates(name):
    load_recipe(name)
    lines = shipped_recipes()[name].read_text().splitlines()
    assert lines[0].startswith("#") and "zotune train" in lines[0], "line 1 must be the command that runs it"
    assert lines[1].startswith("#") and lines[1].strip("# "), "line 2 must describe the recipe"


@pytest.mark.parametrize("extra, message", [
    ("  lazy_update: true", "`lazy_update` was removed on 2026-12-07"),
    ("  offload_transfer_dtype: bfloat16", "`offload_transfer_dtype` needs `offload: cpu`"),
])
def test_incompatible_zo_options_name_the_section(write, extra, message):
    text = TINY.replace("  schedule: sequential", f"  schedule: sequential\n{extra}")
    [p] = problems(write(text))
    assert p.startswith(f"tiny.yaml:{line_of(text, 'zo:')}: zo: ") and message in p


@pytest.mark.parametrize("rule, refused", [("adam", True), ("momentum", True), ("sgd", False), ("sign", False)])
def test_master_weights_none_needs_a_stochastically_rounded_rule_on_16_bit_weights(write, rule, refused):
    text = TINY.replace("  schedule: sequential\n", f"  schedule: dual\n  rule: {rule}\n  master_weights: none\n")
    text = text.replace("model:\n", "model:\n  dtype: bfloat16\n")
    if not refused:
        assert load_recipe(write(text)).zo.master_weights == "none"
        return
    [p] = problems(write(text))
    assert f"zo.master_weights none: rule {rule!r} has no stochastically rounded 16-bit update" in p
    load_recipe(write(text.replace("dtype: bfloat16", "dtype: float32")))  # fp32 weights need no rounding


def test_activation_checkpointing_is_refused_without_a_backward_pass(write):
    text = TINY.replace("  output_dir: runs/tiny\n", "  output_dir: runs/tiny\n  activation_checkpointing: true\n")
    assert any("train.activation_checkpointing" in p and "method 'zo'" in p for p in problems(write(text)))
    from zotune.preflight import training_arguments

    assert training_arguments(load_recipe(write(text.replace("method: zo", "method: fo")))).activation_checkpointing
