"""A Kaggle session's log as far as it has got, read from ``GetKernelSessionLogsStream``.

While a session runs, ListKernelSessionOutput carries no log; Kaggle streams it instead as
Server-Sent Events (``data: {stream_name,time,data}`` lines, ``data: END_OF_LOG`` at the end)
and keeps the stream open until the session ends. gpupool wants "the log so far", so a read
takes what arrives until the stream goes quiet for ``idle_seconds`` or ``budget_seconds`` have
passed, then hangs up. Once the session is over the same call answers the saved log (a JSON
array). Any failure gives None: the caller falls back to what it already knows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from gpupool.errors import GpupoolError

from .client import KaggleRemote, RemoteNotFound, detail
from .config import KaggleConfig
from .outputs import entry_lines, log_lines

log = logging.getLogger(__name__)
END_OF_LOG = "END_OF_LOG"
CHUNK = 1 << 16


def read_live_log(remote: KaggleRemote, record: dict[str, Any], *, idle_seconds: float,
                  budget_seconds: float, clock: Callable[[], float] = time.monotonic
                  ) -> list[str] | None:
    """The session's output lines so far, or None when Kaggle could not give them now.

    ``record`` is the attempt's record (owner, slug, version, session_id). Takes at most about
    ``budget_seconds + idle_seconds`` (a read waits ``idle_seconds`` at most for more bytes)."""
    import requests

    ref = f"{record['owner']}/{record['slug']}"
    try:
        response = remote.open_log_stream(record["owner"], record["slug"], record.get("version"),
                                          record.get("session_id"), idle_seconds)
    except (GpupoolError, requests.RequestException, OSError, ValueError) as err:
        log.info("kaggle: no live log of %s now (%s)", ref, _why(err))
        return None
    try:
        if "text/event-stream" in response.headers.get("Content-Type", ""):
            return _read_events(response, clock() + budget_seconds, clock)
        return log_lines(response.text)
    except (requests.RequestException, OSError, ValueError) as err:
        log.info("kaggle: reading the live log of %s failed (%s)", ref, _why(err))
        return None
    finally:
        response.close()


def _read_events(response: Any, deadline: float, clock: Callable[[], float]) -> list[str]:
    """The lines of the stream's events until END_OF_LOG, a quiet gap, or ``deadline``."""
    import requests
    import urllib3

    entries: list[Any] = []
    try:
        for payload in _event_data(response):
            if payload == END_OF_LOG:
                break
            entries.append(_entry(payload))
            if clock() >= deadline:
                break
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        pass  # a read timeout (the stream went quiet) or a cut: the events so far stand
    return entry_lines(entries)


def _event_data(response: Any) -> Iterator[str]:
    """The ``data:`` fields of a Server-Sent Events stream, one per whole line that has one."""
    pending = b""
    for chunk in _chunks(response):
        *whole, pending = (pending + chunk).split(b"\n")
        for raw in whole:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.startswith("data:"):
                yield line[len("data:"):].strip()


def _chunks(response: Any) -> Iterator[bytes]:
    """The body as it arrives. ``read1`` returns what has come so far; requests' own
    ``iter_lines`` waits for a full 512-byte chunk and loses a partial one at a read timeout."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1.x: a byte at a time, so a quiet gap loses nothing
        yield from response.iter_content(1)
        return
    while chunk := read1(CHUNK, decode_content=True):
        yield chunk


def _entry(payload: str) -> Any:
    """One event's log entry; a line that is not JSON is kept as plain output."""
    try:
        return json.loads(payload)
    except ValueError:
        return {"data": payload}


def _why(err: Exception) -> str:
    """What went wrong, without the request's URL (it may be signed)."""
    if isinstance(err, GpupoolError):
        return detail(err)
    status = getattr(getattr(err, "response", None), "status_code", None)
    return f"{type(err).__name__}" + (f", HTTP {status}" if status else "")


def log_so_far(remote: KaggleRemote, record: dict[str, Any], config: KaggleConfig, *,
               live: bool, clock: Callable[[], float] = time.monotonic) -> list[str]:
    """The session's output lines as far as Kaggle can tell now: the live stream while it
    runs (``live``, read for at most ``config.live_log_seconds`` of ``clock``, monotonic
    seconds), else (or when that fails) the log of its output listing; [] when Kaggle has no
    such kernel or cannot be reached (logged, never raised)."""
    if live:
        lines = read_live_log(remote, record, idle_seconds=config.live_log_idle_seconds,
                              budget_seconds=config.live_log_seconds, clock=clock)
        if lines is not None:
            return lines
    try:
        _, log_text = remote.outputs(record["owner"], record["slug"], record.get("version"))
    except RemoteNotFound:
        return []
    except GpupoolError as err:
        log.warning("kaggle: cannot read the log of %s/%s now (%s)", record["owner"],
                    record["slug"], detail(err))
        return []
    return log_lines(log_text)
