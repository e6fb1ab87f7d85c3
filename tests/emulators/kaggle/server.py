"""The HTTP side: a threaded http.server on 127.0.0.1 that routes, authenticates and injects faults.

Request lines may be origin-form (`POST /api/v1/...`, from the endpoint patch) or absolute-form
(`POST http://localhost/api/v1/...`, from a client sent through HTTP_PROXY); both are served.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import json
import re
import socket
import struct
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from . import api
from .faults import Fault

if TYPE_CHECKING:
    from .emulator import KaggleEmulator

RPC_PATH = re.compile(r"^(?:/api)?/v1/([\w.]+)/(\w+)$")
FILE_PATH = re.compile(r"^/emu/files/(\d+)/(.+)$")
DATASET_PATH = re.compile(r"^/emu/datasets/([^/]+)/([^/]+)/(\d+)(?:\.zip|/(.+))$")
UPLOAD_PATH = re.compile(r"^/emu/upload/([\w-]+)$")


@dataclass
class Reply:
    code: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    payload: Any = None  # the JSON object behind body, so response faults can rewrite it
    log_stream: Any = None  # a running Session whose log is streamed as Server-Sent Events


@dataclass(frozen=True)
class RecordedRequest:
    """What the emulator received, for tests to assert on (auth headers, absolute-form targets)."""

    method: str
    target: str
    endpoint: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def json_reply(code: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(payload).encode()
    return Reply(code, body, {"Content-Type": "application/json", **(headers or {})}, payload)


def endpoint_name(method: str, path: str) -> str:
    """The name faults are queued under: the RPC method, or "download" / "upload"."""
    match = RPC_PATH.match(path)
    if match:
        return match.group(2)
    return "upload" if method == "PUT" else "download"


def authenticate(emu: KaggleEmulator, header: str | None) -> str | None:
    """The username behind an Authorization header (HTTP Basic username:key, or Bearer token)."""
    scheme, _, value = (header or "").partition(" ")
    if scheme == "Bearer":
        return emu.tokens.get(value)
    if scheme != "Basic":
        return None
    try:
        user, _, key = base64.b64decode(value).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user if key and emu.credentials.get(user) == key else None


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emu: KaggleEmulator) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.emu = emu
        self.connections: set[socket.socket] = set()

    def close_connections(self) -> None:
        """End idle keep-alive connections, whose handler threads would otherwise linger."""
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def _serve(self) -> None:
        emu = self.server.emu
        path = urlsplit(self.path).path
        body = self._read_body()
        endpoint = endpoint_name(self.command, path)
        emu.requests.append(
            RecordedRequest(self.command, self.path, endpoint, dict(self.headers), body)
        )
        fault = emu.take_fault(endpoint)
        try:
            if fault is not None and fault.after:
                self._answer_after_effect(fault, self._route(path, body))
                return
            if fault is not None and fault.kind == "reset":
                self._reset()
                return
            if fault is not None and fault.kind == "cut":
                self._route(path, body[: fault.cut_after])  # what arrived before the cut stays
                self._reset()
                return
            if fault is not None and fault.kind == "hang":
                emu.stopping.wait(min(fault.seconds, emu.config.max_hang_seconds))
            reply = (
                _fault_reply(fault)
                if fault is not None and fault.kind == "http"
                else self._route(path, body)
            )
            self._send(
                _rewrite(reply, fault), truncate=fault is not None and fault.kind == "truncate"
            )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout during a hang)

    def _answer_after_effect(self, fault: Fault, reply: Reply) -> None:
        """The request already took effect (``reply`` is its real answer); now misbehave."""
        if fault.kind == "reset":
            self._reset()
            return
        if fault.kind == "hang":
            self.server.emu.stopping.wait(min(fault.seconds, self.server.emu.config.max_hang_seconds))
            self._send(reply)
            return
        self._send(_fault_reply(fault) if fault.kind == "http" else _rewrite(reply, fault))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), so the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _send(self, reply: Reply, truncate: bool = False) -> None:
        if reply.log_stream is not None:
            self._stream_log(reply.log_stream)
            return
        self.send_response(reply.code)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body[: len(reply.body) // 2] if truncate else reply.body)
        if truncate:
            self.close_connection = True

    def _stream_log(self, session: Any) -> None:
        """Kaggle's live log: every line so far as an SSE ``data: {json}`` event, then each new
        one as the kernel prints it, then ``data: END_OF_LOG`` once the session is over (or the
        emulator stops). The connection closes after it; a client may hang up at any time."""
        emu = self.server.emu
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0
        while True:
            over = not session.live or emu.stopping.is_set()  # read before the lines: none missed
            fresh = session.log[sent:]
            for entry in fresh:
                self.wfile.write(f"data: {json.dumps(entry)}\n\n".encode())
            sent += len(fresh)
            self.wfile.flush()
            if over:
                break
            session.done.wait(0.05)
        self.wfile.write(b"data: END_OF_LOG\n\n")

    def _route(self, path: str, body: bytes) -> Reply:
        emu = self.server.emu
        if self.command == "POST" and (match := RPC_PATH.match(path)):
            return self._rpc(match.group(1), match.group(2), body)
        if self.command == "GET" and (match := FILE_PATH.match(path)):
            return _output_file(emu, int(match.group(1)), unquote(match.group(2)))
        if self.command == "GET" and (match := DATASET_PATH.match(path)):
            owner, slug, number, name = match.groups()
            reply = _dataset_download(emu, owner, slug, int(number), name and unquote(name))
            return _ranged(reply, self.headers.get("Range"))
        if self.command == "PUT" and (match := UPLOAD_PATH.match(path)):
            return _upload(emu, match.group(1), self.headers.get("Content-Range", ""), body)
        return json_reply(404, {"code": 404, "message": f"No route for {self.command} {path}"})

    def _rpc(self, service: str, method: str, body: bytes) -> Reply:
        emu = self.server.emu
        handler = api.HANDLERS.get((service, method))
        if handler is None:
            return json_reply(404, {"code": 404, "message": f"Unknown method {service}/{method}"})
        user = authenticate(emu, self.headers.get("Authorization"))
        if user is None and method not in api.NO_AUTH_METHODS:
            return json_reply(
                401, {"code": 401, "message": "Unauthenticated: bad or missing credentials"}
            )
        if emu.stopping.is_set():
            return json_reply(503, {"code": 503, "message": "The emulator is stopping"})
        try:
            with emu.lock:
                result = handler(emu, user or "", json.loads(body or b"{}"))
        except api.ApiError as error:
            return json_reply(error.code, {"code": error.code, "message": error.message})
        if isinstance(result, api.Redirect):
            return Reply(302, b"", {"Location": result.location})
        if isinstance(result, api.LogStream):
            if result.session.live:
                return Reply(200, log_stream=result.session)
            return json_reply(200, result.session.log)  # after the run: the saved log
        return json_reply(200, result)


def _fault_reply(fault: Fault) -> Reply:
    return json_reply(fault.code, fault.body or {}, dict(fault.headers))


def _rewrite(reply: Reply, fault: Fault | None) -> Reply:
    """Apply the faults that alter an otherwise normal JSON answer."""
    if fault is None or not isinstance(reply.payload, dict) or reply.code != 200:
        return reply
    if fault.kind == "extra_fields":
        return json_reply(reply.code, {**reply.payload, **fault.fields}, reply.headers)
    if fault.kind == "status":
        return json_reply(reply.code, {**reply.payload, "status": fault.value}, reply.headers)
    return reply


def _file_reply(data: bytes, mtime: float | None = None) -> Reply:
    headers = {"Content-Type": "application/octet-stream"}
    if mtime is not None:
        headers["Last-Modified"] = email.utils.formatdate(mtime, usegmt=True)
    return Reply(200, data, headers)


def _output_file(emu: KaggleEmulator, session_id: int, name: str) -> Reply:
    """A kernel output file, served like a signed URL: no auth needed."""
    session = emu.sessions.get(session_id)
    path = session.outputs.get(name) if session else None
    if path is None:
        return json_reply(404, {"code": 404, "message": f"No output {name!r}"})
    return _file_reply(path.read_bytes(), path.stat().st_mtime)


def _dataset_download(
    emu: KaggleEmulator, owner: str, slug: str, number: int, name: str | None
) -> Reply:
    dataset = emu.datasets.get((owner, slug))
    version = dataset.get_version(number) if dataset else None
    if version is None or (name is not None and name not in version.files):
        return json_reply(
            404, {"code": 404, "message": f"No dataset file {owner}/{slug}/{number}/{name}"}
        )
    if name is not None:
        return _file_reply(version.files[name])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file_name, data in version.files.items():  # fixed dates: the same bytes each time
            archive.writestr(zipfile.ZipInfo(file_name, (1980, 1, 1, 0, 0, 0)), data)
    return _file_reply(buffer.getvalue())


def _ranged(reply: Reply, wanted: str | None) -> Reply:
    """A signed-URL file answer as storage serves it: ``Accept-Ranges: bytes``, and 206 with
    the bytes from ``Range: bytes=N-`` on (what a client resuming a cut download sends)."""
    if reply.code != 200:
        return reply
    headers = {**reply.headers, "Accept-Ranges": "bytes"}
    match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
    if match is None:
        return Reply(200, reply.body, headers)
    start, size = int(match.group(1)), len(reply.body)
    if start >= size:
        return Reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    return Reply(206, reply.body[start:], {**headers,
                                           "Content-Range": f"bytes {start}-{size - 1}/{size}"})


def _upload(emu: KaggleEmulator, token: str, content_range: str, body: bytes) -> Reply:
    """PUT of blob bytes, with the resumable protocol's probe (`Content-Range: bytes */N`)."""
    with emu.lock:
        blob = emu.blobs.get(token)
        if blob is None:
            return json_reply(404, {"code": 404, "message": "Upload URL expired or unknown"})
        if content_range.startswith("bytes */"):
            if blob.complete:
                return json_reply(200, {})
            return Reply(308, b"", {"Range": f"bytes=0-{len(blob.data) - 1}"} if blob.data else {})
        start = re.match(r"bytes (\d+)-", content_range)
        blob.data = blob.data[: int(start.group(1))] + body if start else body
    return json_reply(200, {})
