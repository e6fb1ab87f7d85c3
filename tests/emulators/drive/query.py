"""The subset of Drive v2's ``q`` search language that PyDrive2 and its fsspec layer send.

Supported terms::

    '<id>' in parents          title = '…'   title != '…'   title contains '…'
    trashed = true|false        mimeType = '…'   mimeType != '…'   mimeType contains '…'
    modifiedDate > '2024-01-01T00:00:00'   (also createdDate; operators = != < <= > >=)

joined with ``and``/``or``/``not`` and parentheses. Strings escape ``'`` and ``\\`` with a
backslash. Anything else raises :class:`QueryError`, which the server answers with Drive's
400 "Invalid query", so an unsupported query fails loudly instead of matching wrongly.

Drive quirk kept: ``title`` comparisons ignore case (PyDrive2's fs filters exact titles itself).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone

from .state import DriveFile, DriveState

Predicate = Callable[[DriveFile, DriveState], bool]

_TOKEN = re.compile(r"""\s*(?:
    (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<op>!=|<=|>=|=|<|>)
  | (?P<paren>[()])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
)""", re.VERBOSE)

_COMPARISONS = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


class QueryError(ValueError):
    """The query uses syntax or a field this emulator (or Drive) does not accept."""


def tokenize(query: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    query = query.rstrip()
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if not match or match.end() == pos:
            raise QueryError(f"cannot parse q at {query[pos:]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


def parse(query: str) -> Predicate:
    """Compile a ``q`` string into a predicate over (file, state)."""
    parser = _Parser(tokenize(query))
    predicate = parser.expression()
    leftover = parser.peek()
    if leftover is not None:
        raise QueryError(f"unexpected {leftover[1]!r}")
    return predicate


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, kind: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (kind and token[0] != kind):
            raise QueryError(f"expected {kind or 'a term'}, got {token}")
        self.pos += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token and token[0] == "word" and token[1].lower() == word:
            self.pos += 1
            return True
        return False

    def expression(self) -> Predicate:
        terms = [self.conjunction()]
        while self.keyword("or"):
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else (lambda f, s: any(t(f, s) for t in terms))

    def conjunction(self) -> Predicate:
        terms = [self.unary()]
        while self.keyword("and"):
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else (lambda f, s: all(t(f, s) for t in terms))

    def unary(self) -> Predicate:
        if self.keyword("not"):
            inner = self.unary()
            return lambda f, s: not inner(f, s)
        if self.peek() == ("paren", "("):
            self.take()
            inner = self.expression()
            if self.take("paren")[1] != ")":
                raise QueryError("unbalanced parentheses")
            return inner
        return self.term()

    def term(self) -> Predicate:
        kind, text = self.take()
        if kind == "string":
            return self._in_parents(unquote(text))
        if kind != "word":
            raise QueryError(f"unexpected {text!r}")
        operator = self.take()[1]
        if operator == "contains":
            return _contains(text, unquote(self.take("string")[1]))
        if operator not in _COMPARISONS:
            raise QueryError(f"unknown operator {operator!r}")
        return _compare(text, operator, self.take())

    def _in_parents(self, parent_id: str) -> Predicate:
        if not self.keyword("in") or not self.keyword("parents"):
            raise QueryError("only '<id>' in parents is supported")
        return lambda f, s: s.resolve(parent_id) in f.parents


def _contains(field: str, needle: str) -> Predicate:
    if field not in ("title", "mimeType"):
        raise QueryError(f"contains is not supported on {field}")
    if field == "title":
        return lambda f, s: needle.casefold() in f.title.casefold()
    return lambda f, s: needle in f.mime_type


def _compare(field: str, operator: str, value: tuple[str, str]) -> Predicate:
    compare = _COMPARISONS[operator]
    if field == "trashed":
        if operator not in ("=", "!=") or value[1] not in ("true", "false"):
            raise QueryError("trashed takes = or != with true/false")
        wanted = value[1] == "true"
        return lambda f, s: compare(s.is_trashed(f), wanted)
    if value[0] != "string":
        raise QueryError(f"{field} needs a quoted string")
    text = unquote(value[1])
    if field in ("title", "mimeType") and operator in ("=", "!="):
        if field == "title":
            return lambda f, s: compare(f.title.casefold(), text.casefold())
        return lambda f, s: compare(f.mime_type, text)
    if field in ("modifiedDate", "createdDate"):
        moment = _parse_date(text)
        attribute = "modified" if field == "modifiedDate" else "created"
        return lambda f, s: compare(getattr(f, attribute), moment)
    raise QueryError(f"unsupported field or operator: {field} {operator}")


def _parse_date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise QueryError(f"bad date {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
