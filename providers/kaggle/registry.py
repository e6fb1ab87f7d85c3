"""Which experiments use which of gpupool's datasets on Kaggle, so that each one is uploaded
once per content and deleted once no experiment needs it.

Two kinds, both found by what they hold, so any attempt of any experiment that needs the same
bytes finds them and uploads nothing:

* ``code``: ``<prefix>-code-<hash>``, one dataset per content of (code bundle, gpupool
  runtime). Deleted as soon as no experiment uses it (it is small: the next one that needs it
  uploads it again).
* ``input``: ``<prefix>-in-<input name>``, one dataset per input name, with a new *version*
  per new content; kernels mount a version by number, so experiments on different contents
  share the dataset. Kept ``unused_input_days`` after the last experiment using it ended (a
  re-run uploads nothing), then deleted. Kaggle cannot delete one version, so versions no
  experiment uses are dropped when the next version is made (``deleteOldVersions``).

An experiment uses a dataset from the first attempt that needs it until the experiment has
ended (succeeded, failed or cancelled, with no session still running): the scheduler says so
through ``Provider.release``. The list is one JSON file under the provider's data dir,
rewritten atomically; an unreadable file reads as empty (nothing is deleted by mistake, at
worst something stays until a person deletes it on kaggle.com).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Entry:
    """One dataset gpupool made: its versions by content, and who uses which."""

    kind: str  # "code" | "input"
    versions: dict[str, int] = field(default_factory=dict)  # content sha256 -> version number
    users: dict[str, str] = field(default_factory=dict)  # experiment id -> content sha256
    unused_since: float | None = None  # epoch seconds the last user ended; None: in use
    retry_at: float | None = None  # a deletion failed: not before this (epoch seconds)


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)

    def get(self, slug: str) -> Entry | None:
        return self._read().get(slug)

    def holding(self, sha256: str, kind: str) -> tuple[str, int] | None:
        """(slug, version) of a dataset of ``kind`` that holds this content, if one does."""
        for slug, entry in self._read().items():
            if entry.kind == kind and sha256 in entry.versions:
                return slug, entry.versions[sha256]
        return None

    def use(self, slug: str, kind: str, sha256: str, version: int, experiment: str) -> None:
        """Record that ``experiment`` uses version ``version`` (holding ``sha256``) of ``slug``."""
        with self._update() as entries:
            entry = entries.setdefault(slug, Entry(kind))
            entry.versions[sha256] = version
            entry.users[experiment] = sha256
            entry.unused_since = entry.retry_at = None

    def others_need_old_versions(self, slug: str, experiment: str) -> bool:
        """Whether an experiment other than ``experiment`` uses a version of ``slug``."""
        entry = self.get(slug)
        return entry is not None and any(user != experiment for user in entry.users)

    def keep_only(self, slug: str, sha256: str) -> None:
        """The older versions were deleted (``deleteOldVersions``): only ``sha256``'s is left."""
        with self._update() as entries:
            entry = entries.get(slug)
            if entry is not None:
                entry.versions = {k: v for k, v in entry.versions.items() if k == sha256}

    def leave(self, slug: str, experiment: str, now: float) -> bool:
        """``experiment`` no longer uses ``slug``; True when nobody else does."""
        with self._update() as entries:
            entry = entries.get(slug)
            if entry is None:
                return False
            entry.users.pop(experiment, None)
            if not entry.users and entry.unused_since is None:
                entry.unused_since = now
            return not entry.users

    def experiments(self) -> set[str]:
        """Every experiment that uses one of the datasets."""
        return {user for entry in self._read().values() for user in entry.users}

    def release(self, experiment: str, now: float) -> None:
        """``experiment`` ended: it uses none of the datasets any more."""
        for slug, entry in self._read().items():
            if experiment in entry.users:
                self.leave(slug, experiment, now)

    def due(self, now: float, keep_seconds: dict[str, float]) -> list[str]:
        """Datasets unused for at least ``keep_seconds[kind]`` seconds: to delete now."""
        return [slug for slug, e in self._read().items()
                if e.unused_since is not None and now - e.unused_since >= keep_seconds[e.kind]
                and (e.retry_at is None or now >= e.retry_at)]

    def postpone(self, slug: str, until: float) -> None:
        """A deletion failed: try again at ``until`` (epoch seconds), not at every step."""
        with self._update() as entries:
            if slug in entries:
                entries[slug].retry_at = until

    def forget(self, slug: str) -> None:
        """The dataset is gone (deleted, or found missing on Kaggle)."""
        with self._update() as entries:
            entries.pop(slug, None)

    def _read(self) -> dict[str, Entry]:
        try:
            raw = json.loads(self.path.read_text())
            return {slug: Entry(**entry) for slug, entry in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    @contextmanager
    def _update(self) -> Iterator[dict[str, Entry]]:
        entries = self._read()
        yield entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({slug: asdict(e) for slug, e in entries.items()}, indent=1))
        os.replace(tmp, self.path)
