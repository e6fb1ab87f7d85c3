"""The private dataset that carries one attempt's inputs into its kernel.

It holds the marker file (which attempt, how to run it), the code bundle, gpupool's runtime
and the checkpoint to resume from. The archives get a ``.gpupool`` suffix so Kaggle keeps them
as files instead of unpacking them; the kernel unpacks them itself. Kaggle processes a new
dataset asynchronously, so the kernel is pushed only once the dataset reads READY.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpupool.bundle import pack_runtime
from gpupool.errors import ProviderError, ProviderUnavailable
from gpupool.provider import Launch

from .client import KaggleRemote, OutcomeUnknown
from .config import KaggleConfig
from .kernel import MARKER

CODE, RUNTIME, CHECKPOINT = "code.gpupool", "runtime.gpupool", "checkpoint.gpupool"
FAILED_STATUSES = frozenset({"FAILED", "DELETED"})


def stage_inputs(launch: Launch, staging: Path, marker: dict[str, Any]) -> list[Path]:
    """Write the dataset's files into ``staging`` (fresh each time); returns them."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(launch.bundle, staging / CODE)
    pack_runtime(staging / RUNTIME)
    if launch.restore is not None:
        restore = launch.store.download(launch.restore, staging / "restore" / launch.restore.name)
        with tarfile.open(staging / CHECKPOINT, "w") as tar:
            tar.add(restore, arcname=launch.restore.name)
        shutil.rmtree(staging / "restore")
    (staging / MARKER).write_text(json.dumps(marker, indent=1))
    return sorted(p for p in staging.iterdir() if p.is_file())


def ensure_dataset(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
                   files: Callable[[], list[Path]], clock: Callable[[], float] = time.monotonic) -> None:
    """Create ``owner/slug`` from ``files()`` unless it exists, then wait until it is READY.

    Raises ProviderError when Kaggle refuses or fails it, ProviderUnavailable when it is not
    ready within ``dataset_ready_timeout`` seconds."""
    if remote.dataset_status(owner, slug) is None:
        tokens = [remote.upload(path) for path in files()]
        create(remote, owner, slug, tokens, private=not config.public)
    wait_ready(remote, config, owner, slug, clock)


def create(remote: KaggleRemote, owner: str, slug: str, tokens: list[str], *, private: bool) -> None:
    """Create the dataset once. After an unclear answer, ask whether it exists before sending
    the create again; the slug is the dataset's key, so a second create can never make a
    second dataset (Kaggle answers "already exists", which counts as done)."""
    try:
        remote.create_dataset(owner, slug, tokens, private=private)
    except OutcomeUnknown:
        if remote.dataset_status(owner, slug) is None:
            remote.create_dataset(owner, slug, tokens, private=private)


def wait_ready(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
               clock: Callable[[], float] = time.monotonic) -> None:
    """Poll until READY. Kaggle is eventually consistent here: a dataset just created may
    answer 404 for a while, so "not found" means "not ready yet" until the timeout."""
    give_up = clock() + config.dataset_ready_timeout
    while True:
        status = remote.dataset_status(owner, slug)
        if status == "READY":
            return
        if status in FAILED_STATUSES:
            raise ProviderError("kaggle", f"dataset {owner}/{slug} is {status}; "
                                          "its upload failed, the next attempt uploads it again")
        if clock() >= give_up:
            raise ProviderUnavailable("kaggle", f"dataset {owner}/{slug} still "
                                                f"{status or 'not found'} after "
                                                f"{config.dataset_ready_timeout:g}s")
        remote.sleep(config.dataset_poll_seconds)
