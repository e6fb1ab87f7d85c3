"""Load YAML files for pydantic models, and turn validation errors into messages with lines."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar, get_args

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
        if mark and "{{resume" in "".join(text.splitlines()[mark.line:mark.line + 1]):
            problem += "; put a command holding {{resume: ...}} in quotes"
        raise SpecError(source, [(where, f"not valid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [("file", "must be a mapping of keys (name: ..., run: ...)")])
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise SpecError(source, duplicates)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise SpecError(source, validation_problems(err, root, model)) from None


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (for line numbers), or None if it does not parse."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def did_you_mean(word: str, choices: Any) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices``, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def locate(text: str, loc: tuple[Any, ...]) -> str:
    """``loc`` as a dotted path with the line it is on (or its nearest parent's), for messages."""
    return locate_in(compose(text), loc)


def locate_in(root: yaml.Node | None, loc: tuple[Any, ...], *, key: bool = False) -> str:
    """Like :func:`locate`, on an already composed node tree; ``key``: the key's own line."""
    line = _line_of(root, loc, key=key) if root is not None else None
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


def validation_problems(err: ValidationError, root: yaml.Node | None, model: type[BaseModel],
                        prefix: tuple[Any, ...] = ()) -> list[tuple[str, str]]:
    """``(where, what)`` for each error of ``model``, whose data sits at ``prefix`` in ``root``:
    the dotted path, its line, and for a misspelt key the closest known one."""
    problems = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = item["type"] == "extra_forbidden"  # point at the misspelt key, not its value
        if loc and loc[-1] == "[key]":  # a bad key of a dict field: pydantic's marker, dropped
            loc, key = loc[:-1], True
        problems.append((locate_in(root, prefix + loc, key=key), _message(item, model, loc)))
    return problems


def _message(item: Any, model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    message = str(item["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if item["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        hint = did_you_mean(loc[-1], known) if known else ""
        message = f"unknown key{hint}" if hint else _unknown_key(known)
    return message


def _unknown_key(known: list[str]) -> str:
    if not known:
        return "unknown key (check its spelling)"
    return f"unknown key; known keys here: {', '.join(sorted(known))}"


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``model`` (nested models only)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None) or {}
    return [name for name in fields if not name.startswith("_")]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as ``Resources`` or ``Resources | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...], *, key: bool = False) -> int | None:
    """The line where the value at ``loc`` is, or its nearest parent that exists; with ``key``,
    the line of the last key itself (a block section's value starts a line below its key)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        found = _child(node, part)
        if found is None:
            break
        node, line = found[0], found[0].start_mark.line + 1
        if key:
            line = found[1].start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
    """(value, the key or item that holds it) of ``part`` inside ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == str(part):
                return value, key
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part], node.value[part]
    return None
