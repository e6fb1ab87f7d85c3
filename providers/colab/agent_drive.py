"""The notebook's Drive v2 client (standard library only; its source is a notebook cell, placed
before ``agent.py``'s).

Every request has a timeout and a bounded retry. Calls that are not idempotent (creating a
folder, uploading a file) are never sent again blindly: when the outcome of one is unknown (a
5xx, a timeout, a reset: Drive may have done it and lost the answer), Drive is asked what
exists under that name before anything is sent again, so one name never gets two objects.
"""

import hashlib
import http.client
import json
import os
import random
import time
import urllib.parse
from pathlib import Path

FOLDER_MIME = "application/vnd.google-apps.folder"
RETRY_STATUSES = {429, 500, 502, 503, 504}
REQUEST_TIMEOUT = 120.0  # seconds: a stalled request is abandoned (then retried) after this


class DriveFailure(RuntimeError):
    """A Drive call failed for good. ``status`` is the HTTP status (None: no answer);
    ``kind`` is "storage-full", "credentials", "gone" (404) or None (transient, retries spent)."""

    def __init__(self, message, status=None, body=b""):
        super().__init__(message)
        self.status = status
        self.body = body
        self.kind = _failure_kind(status, body)


REFUSALS = (b"insufficientPermissions", b"insufficientFilePermissions", b"authError",
            b"appNotAuthorizedToFile", b"forbidden")


def _failure_kind(status, body):
    if status == 403 and b"storageQuotaExceeded" in body:
        return "storage-full"
    if status == 401 or (status == 403 and any(reason in body for reason in REFUSALS)):
        return "credentials"
    if status == 404:
        return "gone"
    return None


def _rate_limited(body):
    return b"rateLimitExceeded" in body or b"userRateLimitExceeded" in body


def _retryable(status, body):
    """Worth sending again: no answer, a 429/5xx, or a rate-limit 403."""
    if status is None or status in RETRY_STATUSES:
        return True
    return status == 403 and _rate_limited(body)


def _range_end(header):
    """The next byte to send after ``Range: bytes=0-n`` (0 when nothing arrived)."""
    if not header:
        return 0
    return int(header.rsplit("-", 1)[1]) + 1


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class DriveREST:
    """A minimal Drive v2 client over ``http.client``: retries, resumable uploads, and
    create-once semantics for inserts."""

    def __init__(self, base_url, token, chunk=8 * 1024 * 1024, retries=6, sleep=time.sleep,
                 timeout=REQUEST_TIMEOUT):
        self.base = base_url.rstrip("/")
        self.token = token  # a callable returning a valid access token
        self.chunk = chunk
        self.retries = retries
        self.sleep = sleep
        self.timeout = timeout

    def _send(self, method, url, body=b"", headers=None):
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.netloc, timeout=self.timeout)
        try:
            path = parts.path + ("?" + parts.query if parts.query else "")
            head = {"Authorization": "Bearer " + self.token(), **(headers or {})}
            conn.request(method, path, body=body, headers=head)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def _backoff(self, attempt):
        self.sleep(min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))

    def request(self, method, url, body=b"", headers=None, ok=(200, 201, 204, 308), retries=None):
        """Send, retrying what Drive says is temporary (only for calls safe to repeat)."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                status, head, data = self._send(method, url, body, headers)
            except (OSError, http.client.HTTPException) as err:
                status, head, data = None, {}, str(err).encode()
            if status in ok:
                return status, head, data
            if not _retryable(status, data) or attempt == retries:
                raise DriveFailure(f"{method} {url.split('?')[0]}: {status} {data[:300]!r}",
                                   status, data)
            self._backoff(attempt)
        raise AssertionError("unreachable")

    def json(self, method, path, payload=None, retries=None, **query):
        url = f"{self.base}/drive/v2/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        body = json.dumps(payload).encode() if payload is not None else b""
        _, _, data = self.request(method, url, body, {"Content-Type": "application/json"},
                                  retries=retries)
        return json.loads(data) if data else {}

    # -- reading ---------------------------------------------------------------------------

    def children(self, parent, title=None):
        q = f"'{parent}' in parents and trashed=false"
        if title is not None:
            q += " and title='" + title.replace("\\", "\\\\").replace("'", "\\'") + "'"
        items, token = [], None
        while True:
            query = {"q": q, "maxResults": 1000, **({"pageToken": token} if token else {})}
            page = self.json("GET", "files", **query)
            items += [i for i in page.get("items", []) if title is None or i["title"] == title]
            token = page.get("nextPageToken")
            if not token:
                return items

    def find(self, parent, title):
        found = sorted(self.children(parent, title), key=lambda i: i.get("modifiedDate", ""))
        return found[-1] if found else None

    def download(self, file_id, target):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        _, _, data = self.request("GET", f"{self.base}/drive/v2/files/{file_id}?alt=media")
        target.write_bytes(data)
        return target

    def download_tree(self, folder_id, target):
        for item in self.children(folder_id):
            path = Path(target) / item["title"]
            if item["mimeType"] == FOLDER_MIME:
                self.download_tree(item["id"], path)
            else:
                self.download(item["id"], path)

    # -- creating, once --------------------------------------------------------------------

    def create_once(self, parent, title, send, same=lambda item: True):
        """Run the insert ``send()`` so that at most one object called ``title`` results.

        Before each send, Drive is asked for a live ``title`` in ``parent`` that ``same``
        accepts; one found is the answer (a lost earlier answer, or work done before).
        Raises ``DriveFailure`` once the retries are spent or the failure is not temporary."""
        for attempt in range(self.retries + 1):
            existing = [i for i in self.children(parent, title) if same(i)]
            if existing:
                return max(existing, key=lambda i: i.get("modifiedDate", ""))
            try:
                return send()
            except DriveFailure as err:
                if not _retryable(err.status, err.body) or attempt == self.retries:
                    raise
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def folder(self, parent, title):
        """The id of folder ``title`` in ``parent``, created (once) when missing."""
        body = {"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent}]}
        item = self.create_once(parent, title, lambda: self.json("POST", "files", body, retries=0),
                                same=lambda i: i.get("mimeType") == FOLDER_MIME)
        return item["id"]

    def upload(self, parent, title, path, mime="application/octet-stream"):
        """A new file through a resumable session (chunks, resumed after a dropped connection).
        When ``title`` already holds these very bytes (an earlier upload whose answer was lost),
        that file is the result; one holding other bytes is replaced."""
        size, md5 = os.path.getsize(path), md5_of(path)
        for stale in self.children(parent, title):
            if stale.get("md5Checksum") != md5 or int(stale.get("fileSize") or -1) != size:
                self.delete(stale["id"])  # one name, one object: the new bytes replace it
        meta = {"title": title, "mimeType": mime, "parents": [{"id": parent}]}
        url = f"{self.base}/upload/drive/v2/files?uploadType=resumable"
        return self.create_once(
            parent, title, lambda: self._resumable("POST", url, meta, path, size, mime),
            same=lambda i: i.get("md5Checksum") == md5 and int(i.get("fileSize") or -1) == size)

    def update(self, file_id, path, mime="application/json"):
        """New content for an existing file (idempotent: sent again as it is)."""
        size = os.path.getsize(path)
        return self._resumable("PUT", f"{self.base}/upload/drive/v2/files/{file_id}"
                                      "?uploadType=resumable", {}, path, size, mime)

    def delete(self, file_id):
        """Delete for good (trashed files still count against the quota); gone already is fine."""
        try:
            self.request("DELETE", f"{self.base}/drive/v2/files/{file_id}")
        except DriveFailure as err:
            if err.status != 404:
                raise

    def _resumable(self, method, url, meta, path, size, mime):
        head = {"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Type": mime,
                "X-Upload-Content-Length": str(size)}
        _, resp_head, _ = self.request(method, url, json.dumps(meta).encode(), head, ok=(200,))
        return self._send_chunks(resp_head["location"], path, size)

    def _send_chunks(self, session, path, size):
        """PUT the file in chunks to its session; a chunk whose answer is lost is resolved by
        asking the session how far it got. Gives up after ``retries`` failures in a row."""
        offset, failures = 0, 0
        with open(path, "rb") as handle:
            while True:
                handle.seek(offset)
                data = handle.read(self.chunk)
                end = offset + len(data) - 1
                content_range = f"bytes {offset}-{end}/{size}" if data else f"bytes */{size}"
                try:
                    status, head, body = self._send("PUT", session, data,
                                                    {"Content-Range": content_range})
                except (OSError, http.client.HTTPException) as err:
                    status, head, body = None, {}, str(err).encode()
                if status in (200, 201):
                    return json.loads(body)
                if status == 308:
                    offset, failures = _range_end(head.get("range")), 0
                    continue
                failures += 1
                if not _retryable(status, body) or failures > self.retries:
                    raise DriveFailure(f"upload of {Path(path).name}: {status} {body[:300]!r}",
                                       status, body)
                self._backoff(failures - 1)
                offset = self._progress(session, size)

    def _progress(self, session, size):
        status, head, _ = self.request("PUT", session, b"", {"Content-Range": f"bytes */{size}"},
                                       ok=(200, 201, 308))
        return _range_end(head.get("range")) if status == 308 else size
