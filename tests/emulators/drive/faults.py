"""Fault injection: queued failures per endpoint, consumed one per matching request.

Endpoint names follow Drive's method ids, plus a few the emulator distinguishes::

    files.list  files.get  files.download (files.get?alt=media)  files.insert  files.update
    files.patch  files.delete  files.trash  files.untrash  files.emptyTrash
    upload.chunk (PUT to a session URI)  about.get  oauth.token  oauth.revoke  *  (any endpoint)

Example::

    drive.inject("files.list", faults.rate_limit(), times=2)
    drive.inject("upload.chunk", faults.cut_upload(after_bytes=100_000))
    drive.inject("files.insert", faults.lost_answer(500))   # created, but the client sees a 500
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .resources import error_body

ENDPOINTS = frozenset({
    "files.list", "files.get", "files.download", "files.insert", "files.update",
    "files.patch", "files.delete", "files.trash", "files.untrash", "files.emptyTrash",
    "upload.chunk",
    "about.get", "oauth.token", "oauth.revoke", "*",
})


@dataclass(frozen=True)
class Fault:
    """One injected failure.

    ``status``: answer with this HTTP status and ``body`` instead of doing the work.
    ``reset``: read the request, then drop the TCP connection with an RST (no response).
    ``cut_after``: read only this many body bytes (an upload chunk keeps them), then reset.
    ``applied``: do the work first, then lose the answer: reply ``status`` instead of the real
    answer, or reset the connection when ``status`` is None (the outcome is unknown to the client).
    """

    status: int | None = None
    body: dict | None = None
    headers: dict = field(default_factory=dict)
    reset: bool = False
    cut_after: int | None = None
    delay: float = 0.0  # stall this long (bounded), then answer normally
    truncate: bool = False  # announce the full Content-Length, send half the body, then close
    applied: bool = False
    hold: threading.Event | None = None  # stall until the test sets it (at most 30 s)

    @property
    def drops_connection(self) -> bool:
        return not self.applied and (self.reset or self.cut_after is not None)


def http_error(status: int, reason: str, message: str, domain: str = "global",
               headers: dict | None = None) -> Fault:
    return Fault(status, error_body(status, reason, message, domain), dict(headers or {}))


def rate_limit(reason: str = "userRateLimitExceeded") -> Fault:
    """Drive's 403 rate limit, which googleapiclient and PyDrive2's fs treat as retryable."""
    message = "User Rate Limit Exceeded" if reason == "userRateLimitExceeded" else \
        "Rate Limit Exceeded"
    return http_error(403, reason, message, domain="usageLimits")


def too_many_requests() -> Fault:
    return http_error(429, "rateLimitExceeded", "Too Many Requests", domain="usageLimits",
                      headers={"Retry-After": "1"})


def server_error(status: int = 500) -> Fault:
    message = "Service Unavailable" if status == 503 else "Backend Error"
    return http_error(status, "backendError", message)


def service_unavailable() -> Fault:
    return server_error(503)


def token_expired() -> Fault:
    """A 401 as Drive sends for an expired or revoked access token."""
    body = error_body(401, "authError", "Invalid Credentials", location="Authorization",
                      location_type="header")
    return Fault(401, body, {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})


def connection_reset() -> Fault:
    return Fault(reset=True)


def hang(seconds: float) -> Fault:
    """Stall before answering (past a client's timeout); bounded to 5 s."""
    return Fault(delay=min(seconds, 5.0))


def lost_answer(status: int | None = None) -> Fault:
    """The request takes effect, but its answer is lost: a 5xx (``status``) or, by default, a
    connection reset after the work is done. A client that sends it again blindly creates a
    second object."""
    if status is None:
        return Fault(reset=True, applied=True)
    return Fault(status, server_error(status).body, applied=True)


def stall_until(release: threading.Event) -> Fault:
    """Stall (after reading the request) until the test sets ``release``, then do the work
    and answer: a client without a timeout waits for it; one with a timeout has moved on."""
    return Fault(hold=release)


def truncated() -> Fault:
    """Answer with half the body under the full Content-Length, then close (a cut download)."""
    return Fault(truncate=True)


def cut_upload(after_bytes: int) -> Fault:
    """Drop the connection after ``after_bytes`` of an upload chunk arrived (they are kept)."""
    return Fault(cut_after=after_bytes)


class FaultPlan:
    """FIFO queues of faults per endpoint; ``"*"`` matches any endpoint after the specific one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}

    def add(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)}")
        with self._lock:
            self._queues.setdefault(endpoint, deque()).extend([fault] * times)

    def take(self, endpoint: str) -> Fault | None:
        with self._lock:
            for name in (endpoint, "*"):
                queue = self._queues.get(name)
                if queue:
                    return queue.popleft()
        return None

    def pending(self, endpoint: str | None = None) -> int:
        """How many injected faults have not fired yet (for one endpoint, or in all)."""
        with self._lock:
            if endpoint is not None:
                return len(self._queues.get(endpoint, ()))
            return sum(len(q) for q in self._queues.values())

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()
