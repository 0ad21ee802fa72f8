"""Load recipes: YAML -> `Recipe`, with errors that name the file, the line and the key.

A recipe is a path or the name of a shipped recipe (`zotune.recipes`). Loading keeps the
line of every key, applies `section.key=value` overrides from the command line, validates
with pydantic and checks that local files exist, all before any weights load. Every
problem found becomes one line `FILE:LINE: key.path: what is wrong`; they are raised
together as one `RecipeError`. The YAML itself is read by `zotune.yaml_safe`, which refuses
what would hang or exhaust the loader.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import weakref
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from zotune.errors import UserError
from zotune.paths import expand_path, looks_local, path_kind
from zotune.schema import Recipe
from zotune.yaml_safe import YAMLProblem, load_yaml

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

log = logging.getLogger("zotune")

# A recipe is a few kilobytes; the limits on its YAML are in zotune.yaml_safe.
MAX_RECIPE_BYTES = 1 << 20  # larger files are refused unread


class RecipeError(UserError):
    """One or more problems in a recipe; `problems` holds one `WHERE: key: what` line each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------- finding recipes


def shipped_recipes() -> dict[str, Traversable]:
    """Name (file name without .yaml) -> file, for every recipe shipped in `zotune.recipes`."""
    found = {p.name[: -len(".yaml")]: p for p in files("zotune.recipes").iterdir() if p.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def resolve(name_or_path: str) -> Path | Traversable:
    """An existing file, else the shipped recipe of that name (with or without .yaml)."""
    path = expand_path(name_or_path)
    kind = path_kind(path)
    if kind == "file":
        return path
    if kind in ("directory", "special"):
        what = "a directory" if kind == "directory" else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"{name_or_path}: {what}; give a recipe .yaml file or the name of a shipped recipe")
    shipped = shipped_recipes()
    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    if name in shipped:
        return shipped[name]
    message = f"no recipe '{name_or_path}': it is not a file and not a shipped recipe"
    close = difflib.get_close_matches(name, list(shipped), n=1)
    if close:
        message += f"; did you mean '{close[0]}'?"
    message += f"\nshipped recipes: {', '.join(shipped) or '(none)'} (see `zotune ls`)"
    raise UserError(message)


class RecipeInfo(NamedTuple):
    name: str
    method: str
    task: str
    command: str  # the first comment line, e.g. `zotune train quickstart`
    description: str  # the second comment line


def describe(name: str, file: Path | Traversable) -> RecipeInfo:
    """What `zotune ls` shows. Reads the YAML without validating, so a broken recipe still lists."""
    text = file.read_text(encoding="utf-8", errors="replace")
    comments = []
    for line in text.splitlines():
        if not line.strip().startswith("#"):
            break
        comments.append(line.strip().lstrip("#").strip())
    try:
        raw = load_yaml(text)[0]
    except YAMLProblem:
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    return RecipeInfo(
        name=name,
        method=str(raw.get("method", "zo")),
        task=str(data.get("task", "?")),
        command=comments[0] if comments else "",
        description=comments[1] if len(comments) > 1 else "",
    )


# ---------------------------------------------------------------- loading


KeyPath = tuple[str, ...]  # a key path, e.g. ("train", "max_steps")


# id(recipe) -> where each of its keys was written, for the recipes load_recipe returns (while they live)
_LOCATIONS: dict[int, dict[KeyPath, str]] = {}


def _remember(recipe: Recipe, where: dict[KeyPath, str]) -> None:
    _LOCATIONS[id(recipe)] = where
    weakref.finalize(recipe, _LOCATIONS.pop, id(recipe), None)


def locate(recipe: Recipe, problem: str) -> str:
    """`problem` ("data.template: ...", starting with a dotted key) prefixed with where that key was written:
    `FILE:LINE: data.template: ...`. Unchanged for a recipe built in code, which was written nowhere."""
    where = _LOCATIONS.get(id(recipe))
    key = re.match(r"^([A-Za-z_]\w*(?:\.\w+)*):", problem)
    if not where or key is None:
        return problem
    return f"{_where(tuple(key.group(1).split('.')), where)}: {problem}"


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override and validate a recipe; raise `RecipeError` listing every problem."""
    file = resolve(name_or_path)
    label = name_or_path if isinstance(file, Path) else str(file)
    data, where, problems = _parse(_read(file, label), label)
    for text in overrides:
        problems += _apply_override(data, where, text)
    problems += _check_files(data, where)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
        _remember(recipe, where)
    except ValidationError as e:
        problems += [_describe_error(err, where) for err in e.errors()]
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        # a validator that met a value of a type it did not expect (e.g. `zo.rule: {name: [1]}`)
        problems.append(f"{where[()]}: (recipe): a value has the wrong type: {type(e).__name__}: {e}")
    if problems:
        raise RecipeError(_sorted(problems, overrides))
    if recipe.model.trust_remote_code:
        log.warning("%s: model.trust_remote_code is on: loading the model runs Python code shipped with the "
                    "checkpoint %s", _where(("model", "trust_remote_code"), where), recipe.model.name_or_path)
    return recipe


def dump_recipe(recipe: Recipe, source: str | None = None, overrides: Sequence[str] = ()) -> str:
    """The resolved recipe (defaults filled in) as YAML, to save next to a run.

    Unset optional keys are left out: all of them default to null, so nothing is lost."""
    header = ""
    if source is not None:
        header = f"# resolved from {source}" + (f" with {' '.join(overrides)}" if overrides else "") + "\n"
    data = recipe.model_dump(mode="json", exclude_none=True)
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _read(file: Path | Traversable, label: str) -> str:
    """The text of a recipe file: regular, at most MAX_RECIPE_BYTES, UTF-8 (a BOM is allowed)."""
    try:
        if isinstance(file, Path):
            if path_kind(file) != "file":
                raise RecipeError([f"{label}:1: not a regular file"])
            with open(file, "rb") as f:
                raw = f.read(MAX_RECIPE_BYTES + 1)
        else:
            raw = file.read_bytes()
    except OSError as e:
        raise RecipeError([f"{label}:1: cannot read the recipe: {e.strerror or e}"]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{label}:1: the file is larger than {MAX_RECIPE_BYTES >> 20} MiB; "
                           "a recipe is a small YAML file"])
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError([f"{label}:1: the file is UTF-16 (or UTF-32) encoded; save it as UTF-8"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError([f"{label}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                           "save the recipe as UTF-8"]) from None


def _parse(text: str, label: str) -> tuple[Any, dict[KeyPath, str], list[str]]:
    """YAML -> (data, key path -> "FILE:LINE", problems such as duplicate keys)."""
    try:
        data, node = load_yaml(text)
    except YAMLProblem as e:
        raise RecipeError([f"{label}:{e.line}: {e.message}"]) from None
    where: dict[KeyPath, str] = {(): f"{label}:1"}
    problems: list[str] = []
    if node is not None:
        _record_lines(node, (), label, where, problems)
    if not isinstance(data, dict):
        raise RecipeError([f"{label}:1: a recipe is a YAML mapping of sections (model, data, train, ...)"])
    return _str_keys(data), where, problems


def _record_lines(node: yaml.Node, path: KeyPath, label: str, where: dict, problems: list) -> None:
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_seen:
                first = first_seen[key]
                problems.append(f"{label}:{line}: {_dotted(path + (key,))}: duplicate key (first at line {first})")
            first_seen.setdefault(key, line)
            where[path + (key,)] = f"{label}:{line}"
            _record_lines(value_node, path + (key,), label, where, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where[path + (str(i),)] = f"{label}:{item.start_mark.line + 1}"
            _record_lines(item, path + (str(i),), label, where, problems)


def _str_keys(value: Any) -> Any:
    # Label values are often written unquoted (`verbalizer: {1: " great"}`), but every
    # mapping in the schema is keyed by strings.
    if isinstance(value, dict):
        return {_str_key(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


def _str_key(key: Any) -> Any:
    return str(key) if isinstance(key, int) and not isinstance(key, bool) else key


def _apply_override(data: dict, where: dict[KeyPath, str], text: str) -> list[str]:
    """Set `a.b.c=value` in data (value read as YAML); return problems with it, if any."""
    label = f"<override {text}>"
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        return [f"{label}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=50"]
    try:
        value = _str_keys(load_yaml(raw)[0])
    except YAMLProblem as e:
        return [f"{label}: {key}: the value is not valid YAML ({e.message.removeprefix('invalid YAML: ')})"]
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
            where[parts[: i + 1]] = label
        elif not isinstance(child, dict):
            return [f"{label}: {_dotted(parts[: i + 1])} is {child!r}, not a section with keys"]
        node = child
    node[parts[-1]] = value
    for p in [p for p in where if p[: len(parts)] == parts]:
        del where[p]  # the file's lines under this key no longer apply
    where[parts] = label
    return []


# ---------------------------------------------------------------- local files


def _short_path(path: str) -> str:
    return path if len(path) <= 200 else path[:197] + "..."


def _check_files(data: dict, where: dict[KeyPath, str]) -> list[str]:
    """Local files the recipe names must exist (checked on the raw data, so it runs even
    when the schema has other problems)."""
    missing = []

    def check(key: KeyPath, path: str, kind: str, *, regular: bool = False) -> None:
        full = expand_path(path)
        found = path_kind(full)
        head = f"{_where(key, where)}: {_dotted(key)}"
        if found is None:
            rel = "" if full.is_absolute() else f" (relative to {os.getcwd()})"
            missing.append(f"{head}: {kind} not found: {_short_path(path)}{rel}")
        elif found == "special" or (regular and found != "file"):
            what = "a directory" if found == "directory" else "a device, FIFO or socket"
            missing.append(f"{head}: {kind} {_short_path(path)} is {what}, not a regular file")

    model = data.get("model")
    if isinstance(model, dict):
        name = model.get("name_or_path")
        if looks_local(name):
            check(("model", "name_or_path"), name, "local model")
        gguf = model.get("gguf_file")
        if isinstance(gguf, str) and name is None:
            check(("model", "gguf_file"), gguf, "GGUF file", regular=True)
    sources: list[tuple[KeyPath, object]] = []
    section = data.get("data")
    if isinstance(section, dict):
        sources += [(("data", split, "path"), section.get(split)) for split in ("train", "eval")]
    bilevel = data.get("bilevel")
    if isinstance(bilevel, dict):
        listed = bilevel.get("sources")
        listed = listed if isinstance(listed, list) else []
        sources += [(("bilevel", "sources", str(i), "path"), source) for i, source in enumerate(listed)]
        sources.append((("bilevel", "validation", "path"), bilevel.get("validation")))
    for key, source in sources:
        if isinstance(source, dict) and not source.get("fallback") and looks_local(source.get("path")):
            check(key, source["path"], "data file")
    return missing


# ---------------------------------------------------------------- pydantic errors -> lines

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
}


def _describe_error(err: dict, where: dict[KeyPath, str]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    kind, value = err["type"], err.get("input")
    if loc and loc[-1] == "[key]":  # a mapping key of the wrong type
        loc = loc[:-1]
        return f"{_where(loc, where)}: {_dotted(loc)}: keys must be strings, got {_short(value)}"
    head = f"{_where(loc, where)}: {_dotted(loc)}"
    if kind == "extra_forbidden":
        return f"{head}: unknown key{_suggest_key(loc)}"
    if kind == "missing":
        return f"{head}: required key is missing"
    if kind == "literal_error":
        allowed = _literal_values(loc) or ()
        message = f"{_short(value)} is not one of: {', '.join(map(str, allowed))}" if allowed else err["msg"]
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        return f"{head}: {message}" + (f"; did you mean '{close[0]}'?" if close else "")
    expected = next((v for k, v in _EXPECTED.items() if kind == k or kind.startswith(k + "_")), None)
    if expected:
        got = "nothing (the value is empty)" if value is None else _short(value)
        return f"{head}: expected {expected}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return f"{head}: {err['msg'].split(', ', 1)[-1]}"
    return f"{head}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_short(value)}"


def _suggest_key(loc: KeyPath) -> str:
    key, model = loc[-1], _model_at(loc[:-1])
    valid = list(model.model_fields) if model else []
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    homes = [s for s in Recipe.model_fields if (s,) != loc[:-1] and key in getattr(_model_at((s,)), "model_fields", {})]
    if homes:
        return f"; it belongs in the {homes[0]} section ({homes[0]}.{key})"
    return f"; valid keys: {', '.join(valid)}" if valid else ""


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_class(a))), None)


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The schema model describing the mapping at this key path, if there is one."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        field = model.model_fields.get(part) if model else None
        model = _model_class(field.annotation) if field else None
    return model


def _literal_values(loc: KeyPath) -> tuple | None:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model and loc else None
    stack = [field.annotation] if field else []
    while stack:
        annotation = stack.pop()
        if get_origin(annotation) is Literal:
            return get_args(annotation)
        stack.extend(get_args(annotation))
    return None


def _where(loc: KeyPath, where: dict[KeyPath, str]) -> str:
    """Where the longest known prefix of this key path was written (a missing key: its section)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in where:
            return where[loc[:n]]
    return where[()]


def _dotted(loc: KeyPath) -> str:
    return ".".join(loc) or "(recipe)"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer too long to print, a structure too deep
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def _sorted(problems: list[str], overrides: Sequence[str]) -> list[str]:
    """The file's problems in line order, then the command line's in its order."""
    labels = [f"<override {o}>: " for o in overrides]

    def key(problem: str) -> tuple[int, int]:
        if problem.startswith("<override"):
            return (1, next((i for i, label in enumerate(labels) if problem.startswith(label)), 0))
        m = re.match(r"^.*?:(\d+): ", problem)
        return (0, int(m.group(1)) if m else 0)

    return sorted(problems, key=key)
