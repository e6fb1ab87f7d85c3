"""An experiment's inputs on Kaggle: datasets named by content, attached to every kernel.

* A local input becomes a private dataset whose slug is its content hash
  (``<prefix>-in-<hash>``): the first attempt that needs a content uploads it (``data.tar``,
  which Kaggle unpacks into ``data/``, plus gpupool's listing of every file's sha256); every
  later attempt, and every other experiment with the same data, finds it READY and uploads
  nothing. Hashes come from the local cache (size + mtime), so an unchanged input is not re-read.
* A Kaggle input (``owner/slug[@version]``) is attached as a dataset source: no transfer.
* A Drive input is downloaded once into the pool's cache by the adapter that owns Drive
  (``gpupool.inputs.InputSources``), then shipped like a local input: one dataset per content.
* A url input is fetched inside the kernel and verified (``gpupool.session_inputs``).

The kernel finds each dataset's folder under ``/kaggle/input`` and verifies uploaded content
byte for byte before the user's command starts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import InputUnavailable
from gpupool.inputs import Content, HashCache, InputSources, hash_content, pack_content
from gpupool.session_inputs import CONTENT_FILE

from .client import KaggleRemote
from .config import KaggleConfig
from .datasets import FAILED_STATUSES, create, wait_ready

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec, InputSpec

PACKED_NAME = "data.tar"  # Kaggle unpacks it into data/ (gpupool.session_inputs.PACKED_DIR)


@dataclass
class InputPlan:
    """What a kernel needs for its inputs: dataset sources to attach, and the marker's part."""

    sources: list[str] = field(default_factory=list)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)


def content_slug(prefix: str, sha256: str) -> str:
    """The dataset slug for one content (Kaggle allows 6-50 characters)."""
    return f"{prefix}-in-{sha256[:24]}"


class InputShipper:
    """Makes sure every input of an experiment is on Kaggle, uploading only what is missing."""

    def __init__(self, remote: KaggleRemote, config: KaggleConfig, owner: str, data_dir: Path,
                 clock: Callable[[], float] = time.monotonic, foreign: InputSources | None = None):
        self.remote, self.config, self.owner, self.clock = remote, config, owner, clock
        self.foreign = foreign  # downloads inputs whose source lives at another provider
        self.data_dir = Path(data_dir)
        self.cache = HashCache(self.data_dir / "inputs" / "hashes.json")

    def check(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Kaggle inputs that do not exist or that this account cannot read; url inputs when
        kernels have no internet."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        for name, item in spec.inputs.items():
            if item.url is not None and not self.config.enable_internet:
                problems.append((("inputs", name, "url"), "Kaggle kernels run without internet "
                                 "here (providers.kaggle.enable_internet: false); use a local "
                                 "or kaggle input instead"))
            if item.kaggle is not None and self._status(item.kaggle) is None:
                problems.append((("inputs", name, "kaggle"),
                                 f"Kaggle dataset {item.kaggle} does not exist or is not readable "
                                 f"by the configured account ({self.owner})"))
        return problems

    def prepare(self, spec: ExperimentSpec) -> InputPlan:
        """Upload missing contents, check attached datasets still exist; returns the plan.

        Raises InputUnavailable when an input is gone (a deleted dataset, a removed folder)."""
        plan = InputPlan()
        for name, item in spec.inputs.items():
            plan.items[name] = self._prepare_one(name, item, plan.sources)
        return plan

    def _prepare_one(self, name: str, item: InputSpec, sources: list[str]) -> dict[str, Any]:
        if item.local is not None:
            ref = self.ensure_content(hash_content(item.local, self.cache))
            sources.append(ref)
            return {"kind": "dataset", "ref": ref, "packed": True}
        if item.kaggle is not None:
            if self._status(item.kaggle) is None:
                raise InputUnavailable("kaggle", f"input {name!r}: Kaggle dataset {item.kaggle} no "
                                                 "longer exists or is not readable by this account")
            ref, _, version = item.kaggle.partition("@")
            sources.append(f"{ref}/{version}" if version else ref)
            return {"kind": "dataset", "ref": ref, "packed": False}
        if item.url is not None:
            return {"kind": "url", "url": item.url, "sha256": item.sha256}
        if self.foreign is None:
            raise InputUnavailable("kaggle", f"input {name!r}: {item.kind} inputs need a pool "
                                             "that can ask the provider holding them")
        ref = self.ensure_content(hash_content(self.foreign.fetch(name, item), self.cache))
        sources.append(ref)
        return {"kind": "dataset", "ref": ref, "packed": True}

    def ensure_content(self, content: Content) -> str:
        """The dataset holding ``content``, uploaded now only if Kaggle does not have it.

        A create that fails leaves no dataset behind: files are uploaded as blobs first and the
        dataset exists only once the create call succeeds."""
        slug = content_slug(self.config.slug_prefix, content.sha256)
        status = self.remote.dataset_status(self.owner, slug)
        if status in FAILED_STATUSES:  # an earlier upload Kaggle could not process: redo it
            self.remote.delete_dataset(self.owner, slug)
            status = None
        if status is None:
            self._upload(content, slug)
        wait_ready(self.remote, self.config, self.owner, slug, self.clock)
        return f"{self.owner}/{slug}"

    def _upload(self, content: Content, slug: str) -> None:
        staging = self.data_dir / "inputs" / "staging" / slug
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            (staging / CONTENT_FILE).write_text(json.dumps(content.listing()))
            packed = pack_content(content, staging / PACKED_NAME)
            tokens = [self.remote.upload(staging / CONTENT_FILE), self.remote.upload(packed)]
            create(self.remote, self.owner, slug, tokens, private=not self.config.public)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _status(self, ref: str) -> str | None:
        owner, slug = ref.partition("@")[0].split("/")
        return self.remote.dataset_status(owner, slug)
