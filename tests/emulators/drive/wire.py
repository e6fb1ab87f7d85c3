"""Request and response values passed between the HTTP plumbing and the endpoint handlers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from email.message import Message

from .resources import error_body


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Message  # case-insensitive lookups
    body: bytes
    origin: str  # scheme://host:port the client addressed, for session URIs
    params: dict[str, str] = field(default_factory=dict)  # from the route's path template
    truncated: bool = False  # a cut_upload fault: keep what arrived, then drop the connection

    def json(self) -> dict:
        if not self.body.strip():
            return {}
        return json.loads(self.body)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


DROP = Response(-1)  # sentinel: drop the connection instead of answering


def json_response(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(payload).encode()
    return Response(status, body, {"Content-Type": "application/json; charset=UTF-8",
                                   **(headers or {})})


def error(status: int, reason: str, message: str, **kwargs) -> Response:
    return json_response(error_body(status, reason, message, **kwargs), status)


def bad_request(message: str, location: str | None = None) -> Response:
    return error(400, "invalid", message, location=location)
