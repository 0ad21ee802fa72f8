"""YAML text -> Python data, refusing what would hang or exhaust the loader.

Recipes and command-line overrides are read with a safe loader (no Python tags), with limits on
hostile or broken YAML: a recipe is a few kilobytes and a few levels deep, so deeper nesting,
recursive aliases and aliases that expand to a "billion laughs" are refused before anything is
built from them. Problems are `YAMLProblem`s carrying the 1-based line they were found on.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 64  # nesting of mappings and sequences, counting what aliases expand to
MAX_NODES = 100_000  # values after expanding aliases (a "billion laughs" expands to 10^9)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`).

    A scalar that the safe constructors cannot convert (a date 2001-13-45, an integer of
    more than 4300 digits) is a located YAML error rather than a bare ValueError."""

    def construct_object(self, node, deep=False):
        try:
            value = super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as e:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {e}",
                                                    node.start_mark) from None
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            # no setting needs more, and Python cannot even print an integer of 0x + 4000 digits
            raise yaml.constructor.ConstructorError(None, None, "an integer larger than 64 bits", node.start_mark)
        return value


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


class YAMLProblem(Exception):
    """YAML that cannot be read, or that would hang or exhaust the loader; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def _line(e: yaml.YAMLError, text: str) -> int:
    if isinstance(e, yaml.reader.ReaderError):
        return text.count("\n", 0, e.position) + 1
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return mark.line + 1 if mark else 1


def _yaml_message(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        char = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        return f"character {char} is not allowed in YAML (nor are NUL and the other control characters)"
    return str(getattr(e, "problem", None) or getattr(e, "context", None) or e)


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """YAML text -> (data, its node graph), refusing what would exhaust the loader.

    Nesting deeper than MAX_DEPTH, recursive aliases and aliases that expand to more than
    MAX_NODES values are refused before anything is built from them. Raises `YAMLProblem`."""
    try:
        loader = _Loader(text)  # the reader refuses control characters here
    except yaml.YAMLError as e:
        raise YAMLProblem(_line(e, text), f"invalid YAML: {_yaml_message(e)}") from None
    try:
        depth = 0  # the parser is not recursive: find deep nesting before the composer recurses
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YAMLProblem(event.start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as e:
        raise YAMLProblem(_line(e, text), f"invalid YAML: {_yaml_message(e)}") from None
    finally:
        loader.dispose()
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node)
        return loader.construct_document(node), node
    except yaml.YAMLError as e:
        raise YAMLProblem(_line(e, text), f"invalid YAML: {_yaml_message(e)}") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Refuse recursive aliases, and aliases expanding beyond MAX_NODES values or MAX_DEPTH levels.

    Iterative, and each node is visited once: the cost is the size of the text, not of its expansion."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            on_path.discard(id(node))
            values = 1 + sum(size[id(c)][0] for c in children)
            depth = 1 + max((size[id(c)][1] for c in children), default=0)
            line = node.start_mark.line + 1
            if values > MAX_NODES:
                raise YAMLProblem(line, f"aliases here expand to more than {MAX_NODES} values")
            if depth > MAX_DEPTH:
                raise YAMLProblem(line, f"aliases here expand to more than {MAX_DEPTH} levels of nesting")
            size[id(node)] = (values, depth)
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise YAMLProblem(node.start_mark.line + 1, "a recursive alias (a value that contains itself)")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
