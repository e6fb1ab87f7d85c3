"""The loopback HTTP server: routing, auth, fault injection, and the :class:`DriveEmulator`."""

from __future__ import annotations

import re
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import files, oauth, uploads
from .faults import Fault, FaultPlan
from .resources import error_body
from .state import DriveState, RequestRecord, utc_now
from .wire import DROP, Request, Response, error, json_response

Handler = Callable[[DriveState, Request], Response]
_ID = r"(?P<file_id>[^/]+)"


@dataclass(frozen=True)
class Route:
    methods: str
    pattern: str
    endpoint: str
    handler: Handler
    needs_auth: bool = True


ROUTES = [
    Route("GET", "/drive/v2/files", "files.list", files.files_list),
    Route("POST", "/drive/v2/files", "files.insert", files.files_insert),
    Route("GET", f"/drive/v2/files/{_ID}", "files.get", files.files_get),
    Route("PUT", f"/drive/v2/files/{_ID}", "files.update", files.files_update),
    Route("PATCH", f"/drive/v2/files/{_ID}", "files.patch", files.files_update),
    Route("DELETE", "/drive/v2/files/trash", "files.emptyTrash", files.files_empty_trash),
    Route("DELETE", f"/drive/v2/files/{_ID}", "files.delete", files.files_delete),
    Route("POST", f"/drive/v2/files/{_ID}/trash", "files.trash", files.files_set_trashed(True)),
    Route("POST", f"/drive/v2/files/{_ID}/untrash", "files.untrash",
          files.files_set_trashed(False)),
    Route("POST", "/upload/drive/v2/files", "files.insert", uploads.upload),
    Route("PUT", f"/upload/drive/v2/files/{_ID}", "files.update", uploads.upload),
    Route("GET", "/drive/v2/about", "about.get", files.about_get),
    Route("POST", "/token|/o/oauth2/token", "oauth.token", oauth.token, needs_auth=False),
    Route("GET", "/o/oauth2/auth|/o/oauth2/v2/auth", "oauth.authorize", oauth.authorize,
          needs_auth=False),
    Route("GET POST", "/revoke|/o/oauth2/revoke", "oauth.revoke", oauth.revoke,
          needs_auth=False),
]
DOWNLOAD = Route("GET", "", "files.download", files.files_download)
CHUNK = Route("PUT POST", "", "upload.chunk", uploads.put_chunk, needs_auth=False)


def resolve(method: str, path: str, query: dict) -> tuple[Route, dict] | None:
    """The route for a request, with the parameters its path carries."""
    if path.startswith("/upload/") and "upload_id" in query and method in CHUNK.methods:
        return CHUNK, {}
    for route in ROUTES:
        match = re.fullmatch(route.pattern, path)
        if match and method in route.methods.split():
            if route.endpoint == "files.get" and query.get("alt") == "media":
                return DOWNLOAD, match.groupdict()
            return route, match.groupdict()
    return None


def _flat(parsed: dict[str, list[str]]) -> dict[str, str]:
    return {k: v[-1] for k, v in parsed.items()}


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httplib2 expects
    disable_nagle_algorithm = True  # headers and body go out in two writes
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        emulator = self.server.emulator
        url = urlsplit(self.path)
        query = _flat(parse_qs(url.query, keep_blank_values=True))
        method = self.headers.get("X-HTTP-Method-Override", self.command).upper()
        route, params = resolve(method, url.path, query) or (None, {})
        endpoint = route.endpoint if route else "unknown"
        fault = emulator.faults.take(endpoint) if route else None
        body = self._read_body(fault)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.hold is not None:
            emulator.count_held(+1)
            try:
                fault.hold.wait(30)
            finally:
                emulator.count_held(-1)
        if method == "GET" and self.command == "POST":  # googleapiclient's form of a long GET
            query.update(_flat(parse_qs(body.decode(), keep_blank_values=True)))
            body = b""
        record = emulator.state.record(RequestRecord(
            method, endpoint, self.path, {k.lower(): v for k, v in self.headers.items()}))
        cut = fault is not None and fault.cut_after is not None
        if fault and fault.drops_connection and not (cut and route is CHUNK):
            return self._drop()
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        request = Request(method, url.path, query, self.headers, body, f"http://{host}",
                          params, cut)
        response = self._dispatch(route, fault, request)
        if fault is not None and fault.applied:  # the work is done; the answer never arrives
            response = DROP if fault.status is None else json_response(
                fault.body or error_body(fault.status, "backendError", "Fault"), fault.status)
        record.status = None if response is DROP else response.status
        if response is DROP:
            return self._drop()
        self._send(response, truncate=fault is not None and fault.truncate)

    def _dispatch(self, route: Route | None, fault: Fault | None, request: Request) -> Response:
        if route is None:
            return error(404, "notFound", f"Not Found: {request.method} {request.path}")
        if fault is not None and fault.status is not None and not fault.applied:
            return json_response(fault.body or error_body(fault.status, "emulated", "Fault"),
                                 fault.status, fault.headers)
        state = self.server.emulator.state
        denial = oauth.unauthorized(state, request) if route.needs_auth else None
        if denial is not None:
            return denial
        try:
            return route.handler(state, request)
        except Exception:  # an emulator bug: answer 500 and make the test see it
            self.server.emulator.errors.append(traceback.format_exc())
            return error(500, "backendError", "Emulator error (see DriveEmulator.errors)")

    def _read_body(self, fault: Fault | None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if fault is not None and fault.cut_after is not None:
            length = min(length, fault.cut_after)
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return bytes(data)

    def _drop(self) -> None:
        """Reset the TCP connection (RST, not FIN), as a broken network path would."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _send(self, response: Response, truncate: bool = False) -> None:
        self.send_response(response.status,
                           "Resume Incomplete" if response.status == 308 else None)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body[: len(response.body) // 2] if truncate else response.body)
        if truncate:
            self.wfile.flush()
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: DriveEmulator) -> None:
        self.emulator = emulator
        super().__init__(("127.0.0.1", 0), _RequestHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up first (its timeout during a hang fault)
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class DriveEmulator:
    """A Drive v2 + OAuth token server on 127.0.0.1 (random port), for the real client stack.

    Use as a context manager (or ``start()``/``stop()``). ``state`` holds the files and
    tokens; ``faults``/``inject`` queue failures; ``errors`` collects emulator tracebacks.
    """

    def __init__(self, *, clock=utc_now, seed: int | None = None, **account) -> None:
        self.state = DriveState(clock=clock, seed=seed, **account)
        self.faults = FaultPlan()
        self.errors: list[str] = []
        self.held = 0  # requests stalled by a ``stall_until`` fault right now
        self._held_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DriveEmulator:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="drive-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DriveEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DriveEmulator is not running; use it as a context manager")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: where the seam sends Google's API and OAuth hosts."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    # ---- conveniences for tests ---------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.state.client_id

    @property
    def client_secret(self) -> str:
        return self.state.client_secret

    @property
    def refresh_token(self) -> str:
        return self.state.refresh_token

    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests to ``endpoint`` (see faults.py)."""
        self.faults.add(endpoint, fault, times)

    def count_held(self, change: int) -> None:
        with self._held_lock:
            self.held += change

    def revoke_refresh_token(self, token: str | None = None) -> None:
        self.state.revoke_refresh_token(token)

    def expire_access_tokens(self) -> None:
        self.state.expire_access_tokens()

    def calls(self, endpoint: str) -> list[RequestRecord]:
        return self.state.calls(endpoint)
