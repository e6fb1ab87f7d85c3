"""The ``files.*`` metadata endpoints and ``about.get`` of Drive v2.

Each handler takes ``(state, request)`` and returns a :class:`~.wire.Response`.
"""

from __future__ import annotations

import base64
import re

from . import query
from .resources import about_resource, file_resource, not_found, select_fields
from .state import DEFAULT_MIME, GOOGLE_APPS_PREFIX, DriveFile, DriveState
from .wire import Request, Response, bad_request, error, json_response

_HANDLED_KEYS = {"title", "mimeType", "parents", "labels"}
_READ_ONLY_KEYS = {"kind", "id", "etag", "selfLink", "fileSize", "md5Checksum", "createdDate",
                   "modifiedDate", "version", "alternateLink", "downloadUrl"}
_ORDER_KEYS = {"createdDate": lambda f: f.created, "modifiedDate": lambda f: f.modified,
               "title": lambda f: f.title.casefold(), "folder": lambda f: not f.is_folder}


# ---- shared by metadata and upload endpoints -------------------------------------------

def quota_error(state: DriveState, extra_bytes: int) -> Response | None:
    """Drive's 403 when an upload would exceed the account's storage (trash counts too)."""
    if state.bytes_used() + extra_bytes <= state.quota_bytes:
        return None
    return error(403, "storageQuotaExceeded",
                 "The user's Drive storage quota has been exceeded.", domain="usageLimits")


def missing_parent(state: DriveState, metadata: dict) -> Response | None:
    for ref in metadata.get("parents") or []:
        if state.get(ref.get("id", "")) is None:
            return json_response(not_found(ref.get("id", "")), 404)
    return None


def create_item(state: DriveState, metadata: dict, content: bytes | None = None,
                media_type: str | None = None) -> DriveFile:
    """files.insert's effect: a new item, even when one with this title exists already."""
    parents = [ref["id"] for ref in metadata.get("parents") or []]
    mime = metadata.get("mimeType") or media_type or DEFAULT_MIME
    extra = {k: v for k, v in metadata.items() if k not in _HANDLED_KEYS | _READ_ONLY_KEYS}
    item = state.create(metadata.get("title") or "Untitled", parents=parents or None,
                        mime_type=mime, content=content, extra=extra)
    item.trashed = bool((metadata.get("labels") or {}).get("trashed", False))
    return item


def apply_metadata(state: DriveState, item: DriveFile, metadata: dict,
                   add_parents: str = "", remove_parents: str = "") -> None:
    """files.update/patch's effect on metadata (fields left out stay as they are)."""
    with state.lock:
        item.title = metadata.get("title", item.title)
        item.mime_type = metadata.get("mimeType") or item.mime_type
        if "parents" in metadata:
            item.parents = [state.resolve(ref["id"]) for ref in metadata["parents"]]
        item.parents += [state.resolve(p) for p in add_parents.split(",") if p]
        removed = {state.resolve(p) for p in remove_parents.split(",") if p}
        item.parents = [p for p in dict.fromkeys(item.parents) if p not in removed]
        if "trashed" in (metadata.get("labels") or {}):
            item.trashed = bool(metadata["labels"]["trashed"])
        item.extra.update({k: v for k, v in metadata.items()
                           if k not in _HANDLED_KEYS | _READ_ONLY_KEYS})
    state.touch(item)


def item_response(state: DriveState, item: DriveFile, fields: str | None = None,
                  status: int = 200) -> Response:
    return json_response(select_fields(file_resource(item, state), fields), status)


# ---- files.list ------------------------------------------------------------------------

def files_list(state: DriveState, req: Request) -> Response:
    try:
        predicate = query.parse(req.query["q"]) if req.query.get("q") else None
    except query.QueryError:
        return bad_request("Invalid query", location="q")
    items = [f for f in state.listing() if predicate is None or predicate(f, state)]
    try:
        items = _ordered(items, req.query.get("orderBy", ""))
        start = _decode_page_token(req.query.get("pageToken"))
    except ValueError as exc:
        return bad_request(f"Invalid Value: {exc}")
    size = max(1, min(int(req.query.get("maxResults", 100)), 1000))
    page = items[start:start + size]
    body = {"kind": "drive#fileList", "etag": f'"{len(state.requests)}"',
            "selfLink": "https://www.googleapis.com/drive/v2/files",
            "items": [file_resource(f, state) for f in page]}
    if start + size < len(items):
        body["nextPageToken"] = base64.urlsafe_b64encode(f"o:{start + size}".encode()).decode()
    return json_response(select_fields(body, req.query.get("fields")))


def _ordered(items: list[DriveFile], order_by: str) -> list[DriveFile]:
    for key in reversed([k.strip() for k in order_by.split(",") if k.strip()]):
        name, _, direction = key.partition(" ")
        if name not in _ORDER_KEYS:
            raise ValueError(f"orderBy {name!r}")
        items = sorted(items, key=_ORDER_KEYS[name], reverse=direction.strip() == "desc")
    return items


def _decode_page_token(token: str | None) -> int:
    if not token:
        return 0
    match = re.fullmatch(r"o:(\d+)", base64.urlsafe_b64decode(token.encode()).decode())
    if not match:
        raise ValueError("pageToken")
    return int(match.group(1))


# ---- files.get / download --------------------------------------------------------------

def files_get(state: DriveState, req: Request) -> Response:
    item = state.get(req.params["file_id"])
    if item is None:
        return json_response(not_found(req.params["file_id"]), 404)
    return item_response(state, item, req.query.get("fields"))


def files_download(state: DriveState, req: Request) -> Response:
    """``files.get?alt=media``: the bytes, honouring a ``Range: bytes=a-b`` header."""
    item = state.get(req.params["file_id"])
    if item is None:
        return json_response(not_found(req.params["file_id"]), 404)
    if item.content is None or item.mime_type.startswith(GOOGLE_APPS_PREFIX):
        return error(403, "fileNotDownloadable", "Only files with binary content can be "
                     "downloaded. Use Export with Docs Editors files.", location="alt")
    content, headers = item.content, {"Content-Type": item.mime_type}
    wanted = req.headers.get("Range")
    if not wanted:
        return Response(200, content, headers)
    span = _parse_range(wanted, len(content))
    if span is None:
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
    first, last = span
    headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
    return Response(206, content[first:last + 1], headers)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or not (match.group(1) or match.group(2)):
        return None
    if not match.group(1):  # suffix form: the last N bytes
        first, last = max(0, size - int(match.group(2))), size - 1
    else:
        first = int(match.group(1))
        last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    return (first, last) if first < size and first <= last else None


# ---- insert / update / patch / trash / delete ------------------------------------------

def files_insert(state: DriveState, req: Request) -> Response:
    metadata = req.json()
    refusal = missing_parent(state, metadata) or quota_error(state, 0)
    if refusal:
        return refusal
    content = None if (metadata.get("mimeType") or "").startswith(GOOGLE_APPS_PREFIX) else b""
    return item_response(state, create_item(state, metadata, content), req.query.get("fields"))


def files_update(state: DriveState, req: Request) -> Response:
    """Metadata-only files.update (PUT) and files.patch (PATCH) behave alike here."""
    item = state.get(req.params["file_id"])
    if item is None:
        return json_response(not_found(req.params["file_id"]), 404)
    metadata = req.json()
    refusal = missing_parent(state, metadata)
    if refusal:
        return refusal
    apply_metadata(state, item, metadata, req.query.get("addParents", ""),
                   req.query.get("removeParents", ""))
    return item_response(state, item, req.query.get("fields"))


def files_set_trashed(trashed: bool):
    def handler(state: DriveState, req: Request) -> Response:
        item = state.get(req.params["file_id"])
        if item is None:
            return json_response(not_found(req.params["file_id"]), 404)
        with state.lock:
            item.trashed = trashed
        state.touch(item)
        return item_response(state, item, req.query.get("fields"))
    return handler


def files_delete(state: DriveState, req: Request) -> Response:
    if state.get(req.params["file_id"]) is None:
        return json_response(not_found(req.params["file_id"]), 404)
    state.delete(req.params["file_id"])
    return Response(204)


def files_empty_trash(state: DriveState, req: Request) -> Response:
    """``DELETE files/trash``: permanently delete every trashed item (frees its quota)."""
    with state.lock:
        doomed = [f.id for f in state.listing() if f.trashed]
    for item_id in doomed:
        state.delete(item_id)
    return Response(204)


def about_get(state: DriveState, req: Request) -> Response:
    return json_response(select_fields(about_resource(state), req.query.get("fields")))
