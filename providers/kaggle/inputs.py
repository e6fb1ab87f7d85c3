"""An experiment's inputs on Kaggle: uploaded once per content, attached to every kernel.

* A local input goes into the private dataset of its name (``<prefix>-in-<name>``): the first
  attempt that needs a content makes a new *version* of it (``data.tar``, which Kaggle unpacks
  into ``data/``, plus gpupool's listing of every file's sha256); every later attempt, and
  every other experiment with the same data, finds that content among the versions gpupool
  made (registry.py) and mounts that version by number, uploading nothing. Hashes come from
  the local cache (size + mtime), so an unchanged input is not re-read. When and how these
  datasets are deleted: registry.py.
* A Kaggle input (``owner/slug[@version]``) is attached as a dataset source: no transfer.
* A Drive input is downloaded once into the pool's cache by the adapter that owns Drive
  (``gpupool.inputs.InputSources``), then shipped like a local input (a version of its dataset).
* A url input is fetched inside the kernel and verified (``gpupool.session.inputs``).

The kernel finds each dataset's folder under ``/kaggle/input`` and verifies uploaded content
byte for byte before the user's command starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupool.errors import InputUnavailable
from gpupool.inputs import Content, HashCache, InputSources, foreign_content, hash_content, pack_content
from gpupool.manifest import sha256_file
from gpupool.session.inputs import CONTENT_FILE

from .client import KaggleRemote
from .config import KaggleConfig
from .datasets import FAILED_STATUSES, add_version, create, wait_ready
from .registry import Registry

if TYPE_CHECKING:
    from gpupool.spec import ExperimentSpec, InputSpec

PACKED_NAME = "data.tar"  # Kaggle unpacks it into data/ (gpupool.session.inputs.PACKED_DIR)


@dataclass
class InputPlan:
    """What a kernel needs for its inputs: dataset sources to attach, and the marker's part."""

    sources: list[str] = field(default_factory=list)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)


def input_slug(prefix: str, name: str) -> str:
    """The dataset of input ``name`` (Kaggle wants 6-50 characters of [a-z0-9-])."""
    clean = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"
    return f"{prefix}-in-{clean}"[:50].rstrip("-")


class InputShipper:
    """Makes sure every input of an experiment is on Kaggle, uploading only what is missing."""

    def __init__(self, remote: KaggleRemote, config: KaggleConfig, owner: str, data_dir: Path,
                 clock: Callable[[], float] = time.monotonic, foreign: InputSources | None = None,
                 registry: Registry | None = None):
        self.remote, self.config, self.owner, self.clock = remote, config, owner, clock
        self.foreign = foreign  # downloads inputs whose source lives at another provider
        self.data_dir = Path(data_dir)
        self.cache = HashCache(self.data_dir / "inputs" / "hashes.json")
        self.registry = registry or Registry(self.data_dir / "datasets.json")

    def check(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Kaggle inputs that do not exist or that this account cannot read; url inputs when
        kernels have no internet."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        for name, item in spec.inputs.items():
            if item.url is not None and not self.config.enable_internet:
                problems.append((("inputs", name, "url"), "Kaggle kernels run without internet "
                                 "here (providers.kaggle.enable_internet: false); use a local "
                                 "or kaggle input instead"))
            missing = self._missing(item.kaggle) if item.kaggle is not None else None
            if missing is not None:
                problems.append((("inputs", name, "kaggle"),
                                 f"{missing} does not exist or is not readable by the configured "
                                 f"account ({self.owner})"))
        return problems

    def prepare(self, spec: ExperimentSpec, experiment: str = "") -> InputPlan:
        """Upload missing contents, check attached datasets still exist; returns the plan.
        ``experiment`` is recorded as a user of the datasets it needs (see registry.py).

        Raises InputUnavailable when an input is gone (a deleted dataset, a removed folder)."""
        plan = InputPlan()
        for name, item in spec.inputs.items():
            plan.items[name] = self._prepare_one(name, item, plan.sources, experiment)
        return plan

    def _prepare_one(self, name: str, item: InputSpec, sources: list[str],
                     experiment: str) -> dict[str, Any]:
        if item.local is not None:
            content = hash_content(item.local, self.cache)
            ref = self.ensure_content(name, content, experiment)
            sources.append(ref)
            return {"kind": "dataset", "ref": ref, "packed": True}
        if item.kaggle is not None:
            missing = self._missing(item.kaggle)
            if missing is not None:
                raise InputUnavailable("kaggle", f"input {name!r}: {missing} no longer exists "
                                                 "or is not readable by this account")
            ref, _, version = item.kaggle.partition("@")
            sources.append(f"{ref}/{version}" if version else ref)
            return {"kind": "dataset", "ref": ref, "packed": False}
        if item.url is not None:
            return {"kind": "url", "url": item.url, "sha256": item.sha256}
        content = foreign_content(self.foreign, "kaggle", name, item, self.cache)
        ref = self.ensure_content(name, content, experiment)
        sources.append(ref)
        return {"kind": "dataset", "ref": ref, "packed": True}

    def ensure_content(self, name: str, content: Content, experiment: str = "") -> str:
        """``owner/slug/version`` of a dataset version holding ``content``, made now only if
        gpupool has none: a new version of input ``name``'s dataset (the dataset itself when
        it does not exist yet). Older versions no other experiment uses are dropped then.

        A create that fails leaves no dataset behind: files are uploaded as blobs first and
        the dataset (or version) exists only once the create call succeeds."""
        held = self.registry.holding(content.sha256, "input")
        if held is not None and self._usable(held[0]):
            slug, version = held
        else:
            slug = input_slug(self.config.slug_prefix, name)
            version = self._upload(slug, content, experiment)
        self.registry.use(slug, "input", content.sha256, version, experiment)
        return f"{self.owner}/{slug}/{version}"

    def _usable(self, slug: str) -> bool:
        """Whether the dataset is still there and READY (a person may have deleted it)."""
        status = self.remote.dataset_status(self.owner, slug)
        if status == "READY":
            return True
        if status is not None and status not in FAILED_STATUSES:
            wait_ready(self.remote, self.config, self.owner, slug, self.clock)
            return True
        self.registry.forget(slug)
        return False

    def _upload(self, slug: str, content: Content, experiment: str) -> int:
        status = self.remote.dataset_status(self.owner, slug)
        if status in FAILED_STATUSES:  # a first upload Kaggle could not process: redo it
            self.remote.delete_dataset(self.owner, slug)
            self.registry.forget(slug)
            status = None
        staging = self.data_dir / "inputs" / "staging" / slug
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            listing = json.dumps(content.listing()).encode()
            (staging / CONTENT_FILE).write_bytes(listing)
            packed = pack_content(content, staging / PACKED_NAME)
            tokens = [self.remote.upload(staging / CONTENT_FILE, hashlib.sha256(listing).hexdigest()),
                      self.remote.upload(packed, sha256_file(packed))]
            if status is None:
                create(self.remote, self.owner, slug, tokens, private=not self.config.public)
                self.registry.forget(slug)  # a new dataset: versions recorded before are gone
                version = 1
            else:
                delete_old = not self.registry.others_need_old_versions(slug, experiment)
                version = add_version(self.remote, self.config, self.owner, slug, tokens,
                                      delete_old=delete_old, clock=self.clock)
                if delete_old:
                    self.registry.keep_only(slug, "")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        wait_ready(self.remote, self.config, self.owner, slug, self.clock)
        return version

    def _missing(self, ref: str) -> str | None:
        """What of ``owner/slug[@version]`` is not there ("Kaggle dataset owner/slug", or
        "version N of ..."), None when it is. Versions are numbered 1 to the current one
        (Kaggle's dataset view); a missing version would leave the kernel without its data."""
        dataset, _, wanted = ref.partition("@")
        owner, slug = dataset.split("/")
        if self.remote.dataset_status(owner, slug) is None:
            return f"Kaggle dataset {dataset}"
        if wanted:
            current = self.remote.dataset_version(owner, slug)
            if current is None or int(wanted) > current:
                have = f" (the newest is {current})" if current else ""
                return f"version {wanted} of Kaggle dataset {dataset}{have}"
        return None
