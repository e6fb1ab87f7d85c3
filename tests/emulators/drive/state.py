"""What the emulated Drive holds: files, folders, OAuth tokens, upload sessions.

Everything here is plain data guarded by one lock, so a test can read and change it while the
server threads answer requests. Nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import random
import string
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

FOLDER_MIME = "application/vnd.google-apps.folder"
COLAB_MIME = "application/vnd.google.colaboratory"
GOOGLE_APPS_PREFIX = "application/vnd.google-apps."
DEFAULT_MIME = "application/octet-stream"
FREE_QUOTA_BYTES = 15 * 1024**3
ACCESS_TOKEN_SECONDS = 3599

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class DriveFile:
    """One Drive item. Folders have ``content=None``; ``trashed`` is the explicit flag."""

    id: str
    title: str
    mime_type: str
    parents: list[str]
    created: datetime
    modified: datetime
    content: bytes | None = None
    trashed: bool = False
    version: int = 1
    extra: dict = field(default_factory=dict)  # other client metadata (description, properties…)

    @property
    def is_folder(self) -> bool:
        return self.mime_type == FOLDER_MIME

    @property
    def md5_checksum(self) -> str | None:
        return None if self.content is None else hashlib.md5(self.content).hexdigest()

    @property
    def file_size(self) -> int | None:
        return None if self.content is None else len(self.content)

    # camelCase aliases so tests can speak Drive's own field names.
    mimeType = property(lambda self: self.mime_type)
    md5Checksum = property(lambda self: self.md5_checksum)
    fileSize = property(lambda self: self.file_size)
    createdDate = property(lambda self: self.created)
    modifiedDate = property(lambda self: self.modified)


@dataclass
class UploadSession:
    """A resumable upload in progress (``uploadType=resumable``)."""

    id: str
    metadata: dict
    media_type: str
    total: int | None  # None until the client states it ("bytes a-b/*")
    file_id: str | None = None  # set for files.update; for insert, once finished
    received: bytearray = field(default_factory=bytearray)
    finished: bool = False


@dataclass
class RequestRecord:
    """One request the emulator answered, for tests to assert on."""

    method: str
    endpoint: str
    path: str
    headers: dict  # names lower-cased
    status: int | None = None  # None: the connection was dropped (a fault)


class DriveState:
    """The whole emulated account. All mutations go through methods holding ``lock``."""

    def __init__(self, clock: Clock = utc_now, seed: int | None = None,
                 client_id: str = "gpupool-emulator.apps.googleusercontent.com",
                 client_secret: str = "emulator-secret",
                 user_email: str = "tester@example.com",
                 quota_bytes: int = FREE_QUOTA_BYTES) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self._rng = random.Random(seed)
        self.client_id = client_id
        self.client_secret = client_secret
        self.user_email = user_email
        self.quota_bytes = quota_bytes
        self.files: dict[str, DriveFile] = {}
        self.access_tokens: dict[str, datetime] = {}  # token -> expiry
        self.refresh_tokens: dict[str, bool] = {}  # token -> still valid
        self.auth_codes: dict[str, str] = {}  # one-time authorization code -> its redirect_uri
        self.uploads: dict[str, UploadSession] = {}
        self.requests: list[RequestRecord] = []
        self.root_id = "0A" + self._random(16) + "Uk9PVA"
        self._add(DriveFile(self.root_id, "My Drive", FOLDER_MIME, [], self.now(), self.now()))
        self.refresh_token = self.issue_refresh_token()

    # ---- ids and time -------------------------------------------------------------------

    def now(self) -> datetime:
        return self.clock()

    def _random(self, n: int) -> str:
        alphabet = string.ascii_letters + string.digits + "-_"
        return "".join(self._rng.choice(alphabet) for _ in range(n))

    def new_file_id(self) -> str:
        return "1" + self._random(32)

    # ---- files --------------------------------------------------------------------------

    def _add(self, item: DriveFile) -> DriveFile:
        with self.lock:
            self.files[item.id] = item
        return item

    def resolve(self, file_id: str) -> str:
        return self.root_id if file_id == "root" else file_id

    def get(self, file_id: str) -> DriveFile | None:
        with self.lock:
            return self.files.get(self.resolve(file_id))

    def create(self, title: str, *, parents: list[str] | None = None,
               mime_type: str = DEFAULT_MIME, content: bytes | None = None,
               extra: dict | None = None) -> DriveFile:
        """Add a file (or a folder, by mime type). Same titles coexist, as on Drive."""
        now = self.now()
        if content is None and mime_type != FOLDER_MIME and not mime_type.startswith(
                GOOGLE_APPS_PREFIX):
            content = b""
        parent_ids = [self.resolve(p) for p in (parents or [self.root_id])]
        item = DriveFile(self.new_file_id(), title, mime_type, parent_ids, now, now,
                         content=content, extra=dict(extra or {}))
        return self._add(item)

    def mkdir(self, title: str, parent: str = "root") -> DriveFile:
        return self.create(title, parents=[parent], mime_type=FOLDER_MIME)

    def set_content(self, item: DriveFile, content: bytes) -> None:
        with self.lock:
            item.content = bytes(content)
            item.version += 1
            item.modified = self.now()

    def touch(self, item: DriveFile) -> None:
        with self.lock:
            item.version += 1
            item.modified = self.now()

    def is_trashed(self, item: DriveFile, _seen: frozenset = frozenset()) -> bool:
        """Explicitly trashed, or inside a trashed folder (Drive's ``labels.trashed``)."""
        if item.trashed:
            return True
        for parent_id in item.parents:
            parent = self.files.get(parent_id)
            if parent is not None and parent.id not in _seen:
                if self.is_trashed(parent, _seen | {item.id}):
                    return True
        return False

    def children(self, folder_id: str) -> list[DriveFile]:
        folder_id = self.resolve(folder_id)
        with self.lock:
            return [f for f in self.files.values() if folder_id in f.parents]

    def descendants(self, folder_id: str) -> Iterator[DriveFile]:
        for child in self.children(folder_id):
            yield child
            if child.is_folder:
                yield from self.descendants(child.id)

    def delete(self, file_id: str) -> None:
        """Permanently delete; a folder takes its descendants with it."""
        file_id = self.resolve(file_id)
        with self.lock:
            doomed = [d.id for d in self.descendants(file_id)] + [file_id]
            for item_id in doomed:
                self.files.pop(item_id, None)

    def listing(self) -> list[DriveFile]:
        """Every item but the root, oldest first (the order files.list pages through)."""
        with self.lock:
            return [f for f in self.files.values() if f.id != self.root_id]

    def find(self, title: str | None = None, parent: str | None = None) -> list[DriveFile]:
        """Test helper: items by exact title and/or parent id."""
        items = self.listing()
        if title is not None:
            items = [f for f in items if f.title == title]
        if parent is not None:
            items = [f for f in items if self.resolve(parent) in f.parents]
        return items

    def bytes_used(self, in_trash_only: bool = False) -> int:
        with self.lock:
            return sum(f.file_size or 0 for f in self.files.values()
                       if not in_trash_only or self.is_trashed(f))

    # ---- OAuth --------------------------------------------------------------------------

    def issue_refresh_token(self) -> str:
        token = "1//0" + self._random(40)
        with self.lock:
            self.refresh_tokens[token] = True
        return token

    def revoke_refresh_token(self, token: str | None = None) -> None:
        """Revoke one refresh token (default: the account's first one)."""
        with self.lock:
            self.refresh_tokens[token or self.refresh_token] = False

    def refresh_token_valid(self, token: str) -> bool:
        with self.lock:
            return self.refresh_tokens.get(token, False)

    def issue_auth_code(self, redirect_uri: str) -> str:
        """A one-time code, as Google's consent page appends to the redirect address."""
        code = "4/0A" + self._random(30)
        with self.lock:
            self.auth_codes[code] = redirect_uri
        return code

    def take_auth_code(self, code: str) -> str | None:
        """The redirect_uri the code was issued for; None if unknown or already used."""
        with self.lock:
            return self.auth_codes.pop(code, None)

    def issue_access_token(self) -> str:
        token = "ya29.emu-" + self._random(40)
        with self.lock:
            self.access_tokens[token] = self.now() + timedelta(seconds=ACCESS_TOKEN_SECONDS)
        return token

    def access_token_valid(self, token: str) -> bool:
        with self.lock:
            expiry = self.access_tokens.get(token)
        return expiry is not None and self.now() < expiry

    def expire_access_tokens(self) -> None:
        """Make every issued access token invalid (the next call gets a 401)."""
        with self.lock:
            self.access_tokens.clear()

    # ---- uploads and request log --------------------------------------------------------

    def open_upload(self, metadata: dict, media_type: str, total: int | None,
                    file_id: str | None = None) -> UploadSession:
        session = UploadSession(self._random(48), metadata, media_type, total, file_id)
        with self.lock:
            self.uploads[session.id] = session
        return session

    def record(self, record: RequestRecord) -> RequestRecord:
        with self.lock:
            self.requests.append(record)
        return record

    def calls(self, endpoint: str) -> list[RequestRecord]:
        """The requests answered for one endpoint name (e.g. ``"upload.chunk"``)."""
        with self.lock:
            return [r for r in self.requests if r.endpoint == endpoint]
