"""Hostile and broken recipes: every failure is a clean `RecipeError`/`UserError`, fast, never a crash or a hang.

The in-process loader (`load_recipe`, which `zotune validate` and `zotune train` both call) is fuzzed
with hypothesis: random text, random YAML trees, the shipped tiny recipe with random values put in,
known YAML attacks (alias bombs, recursive aliases, deep nesting, python tags, control characters,
huge numbers, impossible dates), odd overrides, and paths to special files, directories and places
outside the recipe's folder. A few cases also run through the CLI in a subprocess: exit status 2,
`error:` lines and no traceback. Every example runs under an alarm, so a hang fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import no_hang as conftest_no_hang
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zotune import recipe as recipe_mod
from zotune.errors import UserError
from zotune.recipe import RecipeError, load_recipe
from zotune.schema import Recipe

from helpers import TINY

FUZZ = settings(max_examples=60, deadline=timedelta(seconds=5), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HANG_SECONDS = 20  # any single load taking this long is a hang


def no_hang(seconds: int = HANG_SECONDS):
    return conftest_no_hang(seconds, "recipe loading")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A recipe folder (the cwd) holding the data files TINY names."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / name).write_text('{"text": "good", "label": 1}\n')
    return tmp_path


def outcome(name: str, overrides=()) -> Recipe | UserError:
    """Load; a Recipe or the clean error. Anything else (a crash, a hang) fails the test."""
    with no_hang():
        try:
            return load_recipe(name, overrides)
        except UserError as e:
            return e


def assert_clean(result, label: str, overrides=()) -> None:
    """A loaded recipe, or an error whose every line says where: the file and line, or the override."""
    if isinstance(result, Recipe):
        return
    assert str(result).strip(), "an error without a message"
    if isinstance(result, RecipeError):
        assert result.problems
        for problem in result.problems:
            located = problem.startswith(f"{label}:") and problem[len(label) + 1:].split(":", 1)[0].isdigit()
            assert located or any(problem.startswith(f"<override {o}>") for o in overrides), problem
            assert "Traceback" not in problem


def write_bytes(folder: Path, data: bytes, name: str = "r.yaml") -> str:
    (folder / name).write_bytes(data)
    return name


# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "~", "..", "/", "/dev/zero", "a" * 300, "{text}", "{0}", "{__class__}", "$(rm -rf /)",
                     "`id`", "; echo pwned", "__import__('os').system('id')", "os:system", "\u202e\u0000x"]),
)
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4)),
    max_leaves=25)

TINY_DATA = yaml.safe_load(TINY)


def key_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from key_paths(v, path + (k,))


PATHS = [p for p in key_paths(TINY_DATA) if p]
SECTION_KEYS = sorted({f"{section}.{key}" for section, fields in
                       ((s, getattr(Recipe.model_fields[s].annotation, "model_fields", {}))
                        for s in Recipe.model_fields)
                       for key in fields})

# known YAML attacks and breakages, as whole documents or as a value
ATTACKS = [
    "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)),  # alias bomb
    "a: &a [*a]\n",
    "a: &a {b: *a}\n",
    "a: &a\n  b: &b\n    c: *a\n",
    "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n",
    "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)),
    "a: !!python/object/apply:os.system ['touch pwned']\n",
    "a: !!python/object/new:subprocess.Popen [['touch', 'pwned']]\n",
    "a: !!python/name:os.system\n",
    "a: !!python/module:os\n",
    "a: !custom 1\n",
    "a: !!binary not*base64\n",
    "a: 1\n---\nb: 2\n",
    "a: " + "9" * 5000 + "\n",
    "a: 2001-13-45\n",
    "a: 1e99999\n",
    "a: 0x" + "f" * 6000 + "\n",
    "? [1, 2]\n: 3\n",
    "? {a: 1}\n: 3\n",
    "<<: 5\n",
    "a: \x00\n",
    "a: \x07\x1b[31m\n",
    "\t- : -\n",
    "'unterminated\n",
    "a: \"\\ud800\"\n",
    "[1, 2]\n",
    "just a string\n",
    "",
]


# ---------------------------------------------------------------- in-process loader


@FUZZ
@given(text=st.text(max_size=400))
def test_random_text(folder, text):
    name = write_bytes(folder, text.encode("utf-8", "surrogatepass"))
    assert_clean(outcome(name), name)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(folder, data):
    name = write_bytes(folder, data)
    assert_clean(outcome(name), name)


@FUZZ
@given(tree=trees)
def test_random_yaml_trees(folder, tree):
    name = write_bytes(folder, yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogatepass"))
    assert_clean(outcome(name), name)


@FUZZ
@given(path=st.sampled_from(PATHS), value=trees)
def test_tiny_recipe_with_a_random_value(folder, path, value):
    data = yaml.safe_load(TINY)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    name = write_bytes(folder, yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass"))
    result = outcome(name)
    assert_clean(result, name)


@FUZZ
@given(path=st.sampled_from(PATHS), attack=st.sampled_from(ATTACKS))
def test_tiny_recipe_with_an_attack_as_a_value(folder, path, attack):
    """Each attack spliced in place of one value of a valid recipe (or appended as a section)."""
    lines = TINY.splitlines(keepends=True)
    key = path[-1] + ":"
    i = next((i for i, line in enumerate(lines) if line.strip().startswith(key)), None)
    assume(i is not None)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    value = attack.replace("a: ", "", 1) if attack.startswith("a: ") else None
    if value is not None and "\n" not in value.rstrip("\n"):
        lines[i] = f"{indent}{key} {value}"
    else:
        lines.append(attack)
    name = write_bytes(folder, "".join(lines).encode("utf-8", "surrogatepass"))
    assert_clean(outcome(name), name)


@pytest.mark.parametrize("attack", ATTACKS, ids=range(len(ATTACKS)))
def test_known_attacks_are_refused_quickly(folder, attack):
    name = write_bytes(folder, attack.encode("utf-8", "surrogatepass"))
    result = outcome(name)
    assert isinstance(result, RecipeError), result  # none of them is a recipe
    assert_clean(result, name)
    assert not (folder / "pwned").exists()


def test_alias_bomb_and_recursion_name_the_cause(folder):
    bomb = write_bytes(folder, ATTACKS[0].encode(), "bomb.yaml")
    assert "expand to more than" in str(outcome(bomb))
    loop = write_bytes(folder, b"a: &a [*a]\n", "loop.yaml")
    assert "recursive alias" in str(outcome(loop))
    deep = write_bytes(folder, ATTACKS[4].encode(), "deep.yaml")
    assert "nested more than" in str(outcome(deep))


def test_aliases_within_limits_still_work(folder):
    """Anchors and merge keys are legitimate YAML: a recipe may use them."""
    text = TINY.replace("zo:\n", "zo: &zo\n") + "x_defaults: &d {max_steps: 5}\n"
    text = text.replace("x_defaults: &d {max_steps: 5}\n", "")
    text = text.replace("train:\n  max_steps: 5", "train:\n  <<: {max_steps: 5}")
    assert isinstance(outcome(write_bytes(folder, text.encode())), Recipe)


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SECTION_KEYS + ["train", "a.b.c", "data.train.path.x", ""]),
              st.one_of(st.text(max_size=40), st.sampled_from(ATTACKS)))), max_size=3))
def test_random_overrides(folder, overrides):
    name = write_bytes(folder, TINY.encode())
    assert_clean(outcome(name, overrides), name, overrides)


# ---------------------------------------------------------------- paths


@pytest.fixture
def specials(folder):
    """Special files: devices, a FIFO, a socket, a directory, and a symlink to a device."""
    fifo = folder / "fifo.jsonl"
    os.mkfifo(fifo)
    sock_path = folder / "sock.jsonl"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    (folder / "dir.jsonl").mkdir()
    (folder / "zero.jsonl").symlink_to("/dev/zero")
    yield ["/dev/zero", "/dev/urandom", "/dev/null", str(fifo), str(sock_path), "zero.jsonl", "./fifo.jsonl"]
    sock.close()


def test_special_files_as_data_or_model_are_refused(folder, specials):
    for path in specials:
        for key, value in [("data.train.path", path), ("model.gguf_file", path)]:
            override = [f"{key}={yaml.safe_dump(value).splitlines()[0]}"]
            if key == "model.gguf_file":
                override += ["model.config=null"]
            result = outcome(write_bytes(folder, TINY.encode()), override)
            assert isinstance(result, RecipeError), (path, key)
            assert "not a regular file" in str(result), str(result)


def test_special_files_and_directories_as_the_recipe_are_refused(folder, specials):
    for path in specials + [str(folder), "/", "/dev", "/proc/self/fd/0"]:
        result = outcome(path)
        assert isinstance(result, UserError) and str(result), path


@FUZZ
@given(path=st.one_of(
    st.builds(lambda n, name: "../" * n + name, st.integers(0, 40), st.text(max_size=30)),
    st.builds(lambda name: "/" + name, st.text(max_size=30)),
    st.builds(lambda user, rest: f"~{user}/{rest}", st.text(max_size=12), st.text(max_size=12)),
    st.sampled_from(["/etc/passwd", "/etc/shadow", "/root/x.jsonl", "/proc/self/environ", "/proc/self/mem",
                     "/" + "a" * 5000 + ".jsonl", "a/" * 3000 + "x.jsonl", "x\x00.jsonl", "/dev/zero",
                     "/dev/urandom", "/dev/stdin", "~root/.ssh/id_rsa.txt"]),
), key=st.sampled_from(["data.train.path", "data.eval.path", "model.name_or_path", "model.gguf_file"]))
def test_random_paths(folder, path, key):
    """Any path in a recipe: loads (paths are not confined to the recipe's folder), or a clean error."""
    name = write_bytes(folder, TINY.encode())
    overrides = [f"{key}={yaml.safe_dump(path, allow_unicode=True).splitlines()[0]}"]
    if key == "model.name_or_path":
        overrides.append("model.config=null")
    result = outcome(name, overrides)
    assert_clean(result, name, overrides)


@FUZZ
@given(name=st.one_of(st.text(max_size=80), st.sampled_from(["/dev/zero", "/dev/urandom", "..", "~nosuchuser/x",
                                                             "a" * 5000, "/proc/self/mem", "x\x00y"])))
def test_random_recipe_names(folder, name):
    result = outcome(name)
    assert isinstance(result, (Recipe, UserError))


def test_oversized_recipe_is_refused_unread(folder):
    name = write_bytes(folder, b"# " + b"x" * recipe_mod.MAX_RECIPE_BYTES + b"\n")
    result = outcome(name)
    assert isinstance(result, RecipeError) and "larger than" in str(result)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1"])
def test_wrong_encodings_name_the_line(folder, encoding):
    text = TINY.replace("task: classification", "task: classification # caf\u00e9")
    name = write_bytes(folder, ("\ufeff" if encoding == "utf-16-le" else "").encode(encoding) + text.encode(encoding))
    result = outcome(name)
    assert isinstance(result, RecipeError)
    if encoding == "latin-1":
        line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "caf" in text_line)
        assert result.problems[0].startswith(f"{name}:{line}: not UTF-8")
    else:
        assert "UTF-16" in str(result)


def test_utf8_bom_is_accepted(folder):
    assert isinstance(outcome(write_bytes(folder, b"\xef\xbb\xbf" + TINY.encode())), Recipe)


# ---------------------------------------------------------------- the CLI, in a subprocess


def zotune(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "zotune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, errors="replace")


CLI_CASES = [
    ("validate", ATTACKS[0]),  # alias bomb
    ("validate", ATTACKS[1]),  # recursive alias
    ("validate", ATTACKS[4]),  # deep nesting
    ("validate", ATTACKS[7]),  # python tag
    ("validate", ATTACKS[14]),  # 5000-digit integer
    ("validate", ATTACKS[21]),  # NUL
    ("validate", TINY.replace("train.jsonl", "/dev/zero")),
    ("train", ATTACKS[0]),
    ("train", TINY.replace("train.jsonl", "/dev/urandom")),
]


@pytest.mark.parametrize("command, text", CLI_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CLI_CASES)])
def test_cli_exit_2_without_traceback(folder, command, text):
    (folder / "r.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
    r = zotune(command, "r.yaml")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (folder / "runs").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("recipe", ["/dev/zero", "fifo.jsonl", "dir.jsonl", "latin1.yaml"])
def test_cli_special_recipe_paths(folder, specials, recipe):
    (folder / "latin1.yaml").write_bytes(b"method: caf\xe9\n")
    r = zotune("validate", recipe)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
