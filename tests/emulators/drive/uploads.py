"""Media uploads: ``uploadType=media``, ``multipart`` and ``resumable`` (insert and update).

Resumable protocol, as googleapiclient's ``HttpRequest.next_chunk`` speaks it:

1. ``POST /upload/drive/v2/files?uploadType=resumable`` (``PUT …/files/<id>`` to update), JSON
   metadata as body, ``X-Upload-Content-Type`` / ``X-Upload-Content-Length`` headers
   -> ``200`` with ``Location: <session URI>`` (on the origin the client addressed).
2. ``PUT <session URI>`` with ``Content-Range: bytes a-b/total`` (``/*`` if unknown)
   -> ``308`` + ``Range: bytes=0-n`` while incomplete, ``200`` + the file resource when done.
3. ``PUT <session URI>`` with ``Content-Range: bytes */total`` asks for the progress (after a
   dropped connection); bytes received before a drop are kept, so the client resumes there.
"""

from __future__ import annotations

import json
import re
from email.message import Message

from .files import apply_metadata, create_item, item_response, missing_parent, quota_error
from .resources import not_found
from .state import DEFAULT_MIME, DriveFile, DriveState, UploadSession
from .wire import DROP, Request, Response, bad_request, error, json_response

_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")


def upload(state: DriveState, req: Request) -> Response:
    """``/upload/drive/v2/files[/<id>]`` without ``upload_id``: a new upload of any type."""
    file_id = req.params.get("file_id")
    if file_id and state.get(file_id) is None:
        return json_response(not_found(file_id), 404)
    kind = req.query.get("uploadType")
    if kind == "resumable":
        return start_session(state, req, file_id)
    if kind == "multipart":
        parsed = parse_multipart(req)
        if parsed is None:
            return bad_request("Malformed multipart body.")
        metadata, content, media_type = parsed
    elif kind == "media":
        metadata, content, media_type = {}, req.body, req.headers.get("Content-Type")
    else:
        return bad_request(f"Invalid upload type: {kind!r}", location="uploadType")
    return store(state, metadata, content, media_type, file_id, req.query.get("fields"))


def store(state: DriveState, metadata: dict, content: bytes, media_type: str | None,
          file_id: str | None, fields: str | None = None) -> Response:
    """Finish an upload: insert a new file, or replace the content of ``file_id``."""
    result = _store(state, metadata, content, media_type, file_id)
    return result if isinstance(result, Response) else item_response(state, result, fields)


def _store(state: DriveState, metadata: dict, content: bytes, media_type: str | None,
           file_id: str | None) -> DriveFile | Response:
    replaced = state.get(file_id) if file_id else None
    growth = len(content) - ((replaced.file_size or 0) if replaced else 0)
    refusal = missing_parent(state, metadata) or quota_error(state, growth)
    if refusal:
        return refusal
    if file_id is None:
        return create_item(state, metadata, content, media_type)
    item = state.get(file_id)
    if item is None:
        return json_response(not_found(file_id), 404)
    if media_type and not metadata.get("mimeType") and item.content is not None:
        metadata = {**metadata, "mimeType": media_type}
    apply_metadata(state, item, metadata)
    state.set_content(item, content)
    return item


def parse_multipart(req: Request) -> tuple[dict, bytes, str | None] | None:
    """Split a ``multipart/related`` body into (metadata, media bytes, media type)."""
    header = Message()
    header["Content-Type"] = req.headers.get("Content-Type", "")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return None
    parts = [_split_part(p) for p in req.body.split(b"--" + boundary.encode())[1:-1]]
    if len(parts) != 2:
        return None
    (_, meta_bytes), (media_headers, content) = parts
    return json.loads(meta_bytes or b"{}"), content, media_headers.get("content-type")


def _split_part(raw: bytes) -> tuple[dict[str, str], bytes]:
    """One MIME part: headers, blank line, body; the line break before a boundary is not body."""
    raw = raw[2:] if raw.startswith(b"\r\n") else raw[1:] if raw.startswith(b"\n") else raw
    breaks = [(raw.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if sep in raw]
    _, separator = min(breaks) if breaks else (0, b"\n\n")
    head, _, body = raw.partition(separator)
    body = body[:-2] if body.endswith(b"\r\n") else body[:-1] if body.endswith(b"\n") else body
    headers = {}
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


# ---- resumable sessions ----------------------------------------------------------------

def start_session(state: DriveState, req: Request, file_id: str | None) -> Response:
    metadata = req.json()
    declared = req.headers.get("X-Upload-Content-Length")
    total = int(declared) if declared and declared.isdigit() else None
    replaced = state.get(file_id) if file_id else None
    growth = (total or 0) - ((replaced.file_size or 0) if replaced else 0)
    refusal = missing_parent(state, metadata) or quota_error(state, growth)
    if refusal:
        return refusal
    media_type = req.headers.get("X-Upload-Content-Type") or metadata.get("mimeType")
    session = state.open_upload(metadata, media_type or DEFAULT_MIME, total, file_id)
    target = f"/{file_id}" if file_id else ""
    location = (f"{req.origin}/upload/drive/v2/files{target}"
                f"?uploadType=resumable&upload_id={session.id}")
    return Response(200, b"", {"Location": location, "X-GUploader-UploadID": session.id})


def put_chunk(state: DriveState, req: Request) -> Response:
    """A PUT to a session URI: a chunk, the final chunk, or a progress query."""
    with state.lock:
        response = _put_chunk(state, req)
    return DROP if req.truncated else response  # a cut: the work is done, the answer is lost


def _put_chunk(state: DriveState, req: Request) -> Response:
    session = state.uploads.get(req.query.get("upload_id", ""))
    if session is None:
        return error(404, "notFound", "Upload session not found or expired.")
    if session.finished:
        return _finished(state, session, req)
    span = _content_range(req)
    if span is None:
        return bad_request("Invalid Content-Range header.")
    first, total = span
    if total is not None:
        session.total = total
    if first is not None:
        if first > len(session.received):
            return _incomplete(session)
        del session.received[first:]
        session.received += req.body
    if session.total is not None and len(session.received) > session.total:
        return bad_request("More bytes than the declared upload length.")
    done = session.total is not None and len(session.received) == session.total
    return _finish(state, session, req) if done else _incomplete(session)


def _content_range(req: Request) -> tuple[int | None, int | None] | None:
    header = req.headers.get("Content-Range")
    if header is None:  # the whole media in one request (also how an empty file is sent)
        return 0, None if req.truncated else len(req.body)
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match:
        return None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


def _incomplete(session: UploadSession) -> Response:
    headers = {"X-GUploader-UploadID": session.id}
    if session.received:
        headers["Range"] = f"bytes=0-{len(session.received) - 1}"
    return Response(308, b"", headers)


def _finish(state: DriveState, session: UploadSession, req: Request) -> Response:
    result = _store(state, session.metadata, bytes(session.received), session.media_type,
                    session.file_id)
    if isinstance(result, Response):
        return result
    session.finished, session.file_id = True, result.id
    return item_response(state, result, req.query.get("fields"))


def _finished(state: DriveState, session: UploadSession, req: Request) -> Response:
    item = state.get(session.file_id or "")
    if item is None:
        return json_response(not_found(session.file_id or ""), 404)
    return item_response(state, item, req.query.get("fields"))
