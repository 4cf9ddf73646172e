"""Strict, bounded YAML: what deqctl reads recipes (a user's, or one inside a checkpoint or
an export someone sent) with.

PyYAML's safe loader constructs no objects, but it accepts duplicate keys (the last one
silently wins) and aliases that expand exponentially: a 429-byte "billion laughs" recipe
becomes gigabytes once anything walks it. Here a document is refused when a key repeats,
when it nests deeper than MAX_DEPTH, or when its aliases expand past MAX_NODES values;
each error is one line with the line number.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 2**20          # a recipe is a few kilobytes
MAX_DEPTH = 32             # recipes nest 4 deep (deq.forward.anderson.m)
MAX_NODES = 10_000         # values after alias expansion; a full recipe has ~200

MERGE = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """A document that is not valid YAML or breaks a bound; str() is one line."""


class _Loader(yaml.SafeLoader):
    """The safe loader with its composer's recursion bounded (deep nesting would otherwise
    end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlError(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _check(root: Node) -> None:
    """Refuse duplicate keys, recursive aliases and expansions past the bounds. Sizes are
    memoised per node, so a shared (aliased) node is measured once: linear in the
    document, however far it would expand."""
    sizes: dict[int, tuple[int, int]] = {}      # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()

    def visit(node: Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlError(f"line {_line(node)}: an alias refers to a value that contains it")
        open_nodes.add(key)
        if isinstance(node, ScalarNode):
            result = (1, 1)
        else:
            if isinstance(node, MappingNode):
                _no_duplicates(node)
                children = [n for pair in node.value for n in pair]
            else:
                children = list(node.value) if isinstance(node, SequenceNode) else []
            values, depth = 1, 0
            for child in children:
                v, d = visit(child)
                values, depth = values + v, max(depth, d)
                if values > MAX_NODES:
                    raise YamlError(f"line {_line(node)}: aliases expand this document past "
                                    f"{MAX_NODES} values")
            result = (values, depth + 1)
            if result[1] > MAX_DEPTH:
                raise YamlError(f"line {_line(node)}: nested more than {MAX_DEPTH} levels "
                                f"deep once its aliases are expanded")
        open_nodes.discard(key)
        sizes[key] = result
        return result

    visit(root)


def _no_duplicates(node: MappingNode) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == MERGE:
            continue          # `<<: *base` merges; keys after it override on purpose
        if key.value in seen:
            shown = key.value if len(key.value) <= 40 else key.value[:40] + "..."
            raise YamlError(f"duplicate key {shown!r} (lines {seen[key.value]} and "
                            f"{_line(key)})")
        seen[key.value] = _line(key)


def load_yaml(text: str) -> Any:
    """The one document in `text` as plain Python values; YamlError (one line) for
    invalid YAML, duplicate keys, too deep nesting or aliases that expand too far."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{len(text)} characters, more than a recipe's {MAX_BYTES}")
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "syntax"
        raise YamlError(f"{where}not valid YAML ({problem})") from None
    finally:
        if loader is not None:
            loader.dispose()
