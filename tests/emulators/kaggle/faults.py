"""Faults a test queues on an endpoint; each request to that endpoint consumes one.

Endpoints are named by RPC method ("SaveKernel", "GetKernelSessionStatus", ...) or by one of the
plain-HTTP routes: "download" (output-file and dataset-zip GETs) and "upload" (blob PUTs).

A fault built with ``after=True`` strikes once the request has taken effect: the push created its
kernel and session, the dataset exists, and only then is the answer an error, late or cut off.
That is the case a client cannot tell from "nothing happened" without asking what exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RATE_LIMIT_BODY = {
    "error": {"code": 429, "message": "Too many requests", "status": "RESOURCE_EXHAUSTED"}
}


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour. Build with the class methods, not the constructor."""

    kind: str  # "http" | "hang" | "reset" | "truncate" | "extra_fields" | "status" | "cut"
    code: int = 500
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    value: str = ""
    after: bool = False  # strike after the request took effect (http, hang, reset)
    cut_after: int = 0  # "cut": body bytes that arrive before the connection is reset

    @classmethod
    def rate_limit(cls, retry_after: float | str = 1) -> Fault:
        """HTTP 429 with Retry-After and the body Kaggle really sends."""
        return cls("http", 429, RATE_LIMIT_BODY, {"Retry-After": str(retry_after)})

    @classmethod
    def http(cls, code: int = 500, body: dict[str, Any] | None = None, *,
             after: bool = False) -> Fault:
        """A bare HTTP error (500, 503, ...); the body has no "code" unless one is given.
        ``after``: the request is carried out first, then answered with the error."""
        body = body if body is not None else {"message": f"emulated {code}"}
        return cls("http", code, body, after=after)

    @classmethod
    def hang(cls, seconds: float, *, after: bool = False) -> Fault:
        """Stall, then answer normally (bounded by Config.max_hang_seconds and by stop()).
        Default: stall before the request takes effect; ``after``: carry it out at once and
        stall only the answer (a client that times out never hears that it worked)."""
        return cls("hang", seconds=seconds, after=after)

    @classmethod
    def reset(cls, *, after: bool = False) -> Fault:
        """Close the connection with a TCP RST instead of answering (``after``: once the
        request has taken effect)."""
        return cls("reset", after=after)

    @classmethod
    def cut(cls, after_bytes: int) -> Fault:
        """An upload PUT cut short: its first ``after_bytes`` arrive and are kept (the blob's
        resumable probe then reports them), then the connection is reset."""
        return cls("cut", cut_after=after_bytes)

    @classmethod
    def truncate(cls) -> Fault:
        """Answer with a Content-Length larger than the half body that is sent, then close."""
        return cls("truncate")

    @classmethod
    def extra_fields(cls, **fields: Any) -> Fault:
        """Answer normally, with these unknown top-level JSON fields added."""
        return cls("extra_fields", fields=fields)

    @classmethod
    def status(cls, value: str) -> Fault:
        """Answer a status call with this (possibly unknown) status string."""
        return cls("status", value=value)
