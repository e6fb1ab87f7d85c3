"""Deleting what gpupool created on Kaggle (an attempt's kernel and its inputs dataset).

Each attempt creates a private kernel and a private dataset (with a copy of the checkpoint it
resumes from). Kaggle limits private storage, so both are deleted once the attempt no longer
needs them: after its outputs and log are collected, or at once when its push is refused. A
deletion that fails (Kaggle down, rate limited) or that must wait for a session to end is
kept in a small JSON list under the provider's data dir and tried again later, so nothing is
orphaned by a transient error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from gpupool.errors import GpupoolError

from .client import KaggleRemote, detail

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    """An attempt's remote objects still to delete; ``after_end``: only once its session ended."""

    attempt: str
    owner: str
    kernel: str
    dataset: str
    after_end: bool = False


class Janitor:
    def __init__(self, remote: KaggleRemote, path: Path):
        self.remote = remote
        self.path = path

    def delete(self, item: Leftover) -> bool:
        """Delete the kernel and the dataset now; on failure remember them. True when done."""
        try:
            self.remote.delete_kernel(item.owner, item.kernel)
            self.remote.delete_dataset(item.owner, item.dataset)
        except GpupoolError as err:
            log.warning("kaggle: could not delete %s/%s yet (%s); will retry", item.owner,
                        item.kernel, detail(err))
            self.remember(item)
            return False
        self.forget(item.attempt)
        return True

    def remember(self, item: Leftover) -> None:
        """Keep ``item`` to delete later (one entry per attempt; the newest wins)."""
        items = {i.attempt: i for i in self.pending()}
        items[item.attempt] = item
        self._write(list(items.values()))

    def forget(self, attempt: str) -> None:
        """Drop the attempt's entry: its objects are gone."""
        items = self.pending()
        if any(i.attempt == attempt for i in items):
            self._write([i for i in items if i.attempt != attempt])

    def pending(self) -> list[Leftover]:
        """What is still to delete ([] when the list is missing or unreadable)."""
        try:
            return [Leftover(**entry) for entry in json.loads(self.path.read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def _write(self, items: list[Leftover]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps([asdict(i) for i in items], indent=1))
        os.replace(tmp, self.path)
