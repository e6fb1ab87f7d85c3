"""Drive v2 JSON shapes: file and about resources, error bodies, ``fields`` partial responses."""

from __future__ import annotations

import re
from datetime import datetime

from .state import COLAB_MIME, DriveFile, DriveState

API = "https://www.googleapis.com/drive/v2"


def rfc3339(moment: datetime) -> str:
    """Drive's timestamp form: UTC, milliseconds, ``Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def alternate_link(item: DriveFile) -> str:
    if item.mime_type == COLAB_MIME:
        return f"https://colab.research.google.com/drive/{item.id}"
    if item.is_folder:
        return f"https://drive.google.com/drive/folders/{item.id}"
    return f"https://drive.google.com/file/d/{item.id}/view?usp=drivesdk"


def parent_reference(item_id: str, parent_id: str, state: DriveState) -> dict:
    return {
        "kind": "drive#parentReference",
        "id": parent_id,
        "selfLink": f"{API}/files/{item_id}/parents/{parent_id}",
        "parentLink": f"{API}/files/{parent_id}",
        "isRoot": parent_id == state.root_id,
    }


def file_resource(item: DriveFile, state: DriveState) -> dict:
    """The full ``drive#file`` resource. Sizes are strings, as v2 sends int64 values."""
    trashed = state.is_trashed(item)
    resource = {
        **item.extra,
        "kind": "drive#file",
        "id": item.id,
        "etag": f'"{item.id}/{item.version}"',
        "selfLink": f"{API}/files/{item.id}",
        "alternateLink": alternate_link(item),
        "title": item.title,
        "mimeType": item.mime_type,
        "labels": {"starred": False, "hidden": False, "trashed": trashed,
                   "restricted": False, "viewed": True},
        "explicitlyTrashed": item.trashed,
        "createdDate": rfc3339(item.created),
        "modifiedDate": rfc3339(item.modified),
        "modifiedByMeDate": rfc3339(item.modified),
        "version": str(item.version),
        "parents": [parent_reference(item.id, p, state) for p in item.parents],
        "ownerNames": ["Emulated User"],
        "editable": True,
        "copyable": True,
        "shared": False,
        "spaces": ["drive"],
        "quotaBytesUsed": str(item.file_size or 0),
    }
    if item.content is not None:
        resource.update(_content_fields(item))
    return resource


def _content_fields(item: DriveFile) -> dict:
    extension = item.title.rsplit(".", 1)[1] if "." in item.title else ""
    return {
        "fileSize": str(item.file_size),
        "md5Checksum": item.md5_checksum,
        "originalFilename": item.extra.get("originalFilename", item.title),
        "fileExtension": extension,
        "fullFileExtension": extension,
        "downloadUrl": f"{API}/files/{item.id}?alt=media&source=downloadUrl",
        "webContentLink": f"https://drive.google.com/uc?id={item.id}&export=download",
        "headRevisionId": f"0B{item.id[:10]}{item.version}",
    }


def about_resource(state: DriveState) -> dict:
    used = state.bytes_used()
    user = {"kind": "drive#user", "displayName": "Emulated User", "isAuthenticatedUser": True,
            "permissionId": "01234567890123456789", "emailAddress": state.user_email}
    return {
        "kind": "drive#about",
        "name": "Emulated User",
        "user": user,
        "rootFolderId": state.root_id,
        "permissionId": user["permissionId"],
        "quotaType": "LIMITED",
        "quotaBytesTotal": str(state.quota_bytes),
        "quotaBytesUsed": str(used),
        "quotaBytesUsedAggregate": str(used),
        "quotaBytesUsedInTrash": str(state.bytes_used(in_trash_only=True)),
        "largestChangeId": str(len(state.requests)),
    }


def error_body(code: int, reason: str, message: str, domain: str = "global",
               location: str | None = None, location_type: str = "parameter") -> dict:
    """Google's JSON error envelope, which googleapiclient's HttpError and PyDrive2 parse."""
    detail = {"domain": domain, "reason": reason, "message": message}
    if location:
        detail.update(locationType=location_type, location=location)
    return {"error": {"errors": [detail], "code": code, "message": message}}


def not_found(file_id: str) -> dict:
    return error_body(404, "notFound", f"File not found: {file_id}", location="fileId")


# ---- partial responses (``fields=``) ----------------------------------------------------

_FIELD_TOKEN = re.compile(r"\s*([^,()/\s]+|[,()/])")


def select_fields(resource: dict, fields: str | None) -> dict:
    """Apply a ``fields`` mask such as ``items(id,title),nextPageToken`` or ``labels/trashed``."""
    if not fields or fields.strip() == "*":
        return resource
    return _apply(resource, _parse_mask(fields))


def _parse_mask(fields: str) -> dict:
    tokens = _FIELD_TOKEN.findall(fields)
    mask, rest = _mask_list(tokens)
    if rest:
        raise ValueError(f"bad fields mask {fields!r}")
    return mask


def _mask_list(tokens: list[str]) -> tuple[dict, list[str]]:
    mask: dict = {}
    while tokens and tokens[0] != ")":
        path, tokens = [tokens[0]], tokens[1:]
        while tokens[:1] == ["/"] and len(tokens) > 1:
            path.append(tokens[1])
            tokens = tokens[2:]
        sub: dict | None = None
        if tokens[:1] == ["("]:
            sub, tokens = _mask_list(tokens[1:])
            tokens = tokens[1:]  # drop ")"
        for name in reversed(path[1:]):
            sub = {name: sub}
        _merge(mask, path[0], sub)
        if tokens[:1] == [","]:
            tokens = tokens[1:]
    return mask, tokens


def _merge(mask: dict, name: str, sub: dict | None) -> None:
    if name in mask and mask[name] is not None and sub is not None:
        mask[name].update(sub)
    else:
        mask[name] = None if name in mask and mask[name] is None else sub


def _apply(value, mask: dict | None):
    if mask is None or "*" in mask:
        return value
    if isinstance(value, list):
        return [_apply(v, mask) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: _apply(value[k], sub) for k, sub in mask.items() if k in value}

