"""Load YAML files for pydantic models, and turn validation errors into messages with lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gpupool.errors import SpecError

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: Path, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Parse ``path`` and validate it as ``model``; every problem is reported with its line."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [("file", "does not exist")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(source, [("file", f"cannot be read: {err}")]) from None
    return parse_yaml_model(text, model, source=source, context=context)


def parse_yaml_model(
    text: str, model: type[M], *, source: str, context: dict[str, Any] | None = None
) -> M:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "file"
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(source, [(where, f"not valid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [("file", "must be a mapping of keys (name: ..., run: ...)")])
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise SpecError(source, duplicates)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise SpecError(source, _problems(err, root)) from None


def locate(text: str, loc: tuple[Any, ...]) -> str:
    """``loc`` as a dotted path with the line it is on (or its nearest parent's), for messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    line = _line_of(root, loc) if root is not None else None
    path = ".".join(str(part) for part in loc) or "file"
    return f"{path} (line {line})" if line else path


def _duplicate_keys(root: yaml.Node | None) -> list[tuple[str, str]]:
    """Keys given twice in one mapping: YAML lets the last one win silently, which hides typos."""
    problems: list[tuple[str, str]] = []
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node | None, str]] = [(root, "")]
    while pending:
        node, prefix = pending.pop()
        if node is None or id(node) in seen_nodes:
            continue  # aliases may point back at a parent
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = f"{prefix}{key.value}" if isinstance(key, yaml.ScalarNode) else prefix + "?"
                if isinstance(key, yaml.ScalarNode) and name in keys:
                    line = key.start_mark.line + 1
                    problems.append((f"{name} (line {line})", "is given twice; remove one"))
                keys.add(name)
                pending.append((value, name + "."))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{prefix.rstrip('.')}.{i}.") for i, item in enumerate(node.value))
    return sorted(problems)


def _problems(err: ValidationError, root: yaml.Node | None) -> list[tuple[str, str]]:
    problems = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join(loc) or "file"
        line = _line_of(root, item["loc"])
        where = f"{path} (line {line})" if line else path
        problems.append((where, _message(item)))
    return problems


def _message(item: Any) -> str:
    message = str(item["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if item["type"] == "extra_forbidden":
        message = "unknown key (check its spelling)"
    return message


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line where the value at ``loc`` is, or its nearest parent that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: Any) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == str(part):
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None
