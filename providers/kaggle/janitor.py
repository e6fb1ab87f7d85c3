"""Deleting what gpupool created on Kaggle.

* An attempt's kernel, and its checkpoint dataset (a copy of the checkpoint it resumes from;
  ``dataset`` is "" when it resumed from none): deleted once the attempt no longer needs them,
  after its outputs and log are collected, or at once when its push is refused. A deletion
  that fails (Kaggle down, rate limited) or that must wait for a session to end is kept in a
  small JSON list under the provider's data dir and tried again later, so nothing is orphaned
  by a transient error.
* The code and input datasets shared by attempts and experiments (registry.py): deleted by
  ``delete_unused`` once no experiment has used them for as long as their kind is kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gpupool.errors import GpupoolError

from .client import KaggleRemote, detail
from .registry import Registry

log = logging.getLogger(__name__)
RETRY_SECONDS = 300.0  # after a failed deletion of a shared dataset


@dataclass(frozen=True)
class Leftover:
    """An attempt's remote objects still to delete (``dataset``: its checkpoint dataset, ""
    when none); ``after_end``: only once its session ended."""

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
            if item.dataset:
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


def drop_made(remote: KaggleRemote, registry: Registry, experiment: str, owner: str,
              made: list[str], now: float) -> None:
    """An attempt that made shared datasets (its code) did not run: delete each one no other
    experiment uses by now, so a refused or failed push leaves no new dataset behind. One that
    cannot be deleted now is marked unused, and ``release_ended`` deletes it later."""
    for slug in made:
        if not registry.leave(slug, experiment, now):
            continue
        try:
            remote.delete_dataset(owner, slug)
        except GpupoolError as err:
            log.warning("kaggle: could not delete %s/%s yet (%s)", owner, slug, detail(err))
            continue
        registry.forget(slug)


def release_ended(account: Callable[[], tuple[KaggleRemote, str]], registry: Registry,
                  ended: Callable[[str], bool], now: float, keep_seconds: dict[str, float]) -> None:
    """Experiments for which ``ended(id)`` is true use no shared dataset any more; then the
    datasets unused long enough are deleted. Reads one small file when there is nothing to
    do (it runs after every scheduler step); ``account()`` (the client and the owner, which
    need credentials) is asked only when something is to be deleted."""
    for experiment in registry.experiments():
        if ended(experiment):
            registry.release(experiment, now)
    if registry.due(now, keep_seconds):
        remote, owner = account()
        delete_unused(remote, registry, owner, now, keep_seconds)


def delete_unused(remote: KaggleRemote, registry: Registry, owner: str, now: float,
                  keep_seconds: dict[str, float]) -> list[str]:
    """Delete the shared datasets no experiment has used for ``keep_seconds[kind]`` seconds;
    returns their slugs. One that cannot be deleted now is tried again after RETRY_SECONDS."""
    deleted = []
    for slug in registry.due(now, keep_seconds):
        try:
            remote.delete_dataset(owner, slug)
        except GpupoolError as err:
            log.warning("kaggle: could not delete unused dataset %s/%s yet (%s); will retry",
                        owner, slug, detail(err))
            registry.postpone(slug, now + RETRY_SECONDS)
            continue
        registry.forget(slug)
        deleted.append(slug)
    return deleted
