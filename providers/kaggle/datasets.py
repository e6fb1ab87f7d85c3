"""The private dataset that carries one attempt's inputs into its kernel; and an existing
dataset downloaded for a session elsewhere (``download_input``).

It holds the marker file (which attempt, how to run it), the code bundle, gpupool's runtime
and the checkpoint to resume from. The archives get a ``.gpupool`` suffix so Kaggle keeps them
as files instead of unpacking them; the kernel unpacks them itself. Kaggle processes a new
dataset asynchronously, so the kernel is pushed only once the dataset reads READY.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpupool.bundle import pack_runtime
from gpupool.errors import InputUnavailable, ProviderError, ProviderUnavailable
from gpupool.inputs import progress_bar
from gpupool.provider import Launch

from .client import KaggleRemote, OutcomeUnknown, RemoteNotFound
from .config import KaggleConfig
from .kernel import MARKER

CODE, RUNTIME, CHECKPOINT = "code.gpupool", "runtime.gpupool", "checkpoint.gpupool"
FAILED_STATUSES = frozenset({"FAILED", "DELETED"})
STREAM_CHUNK = 64 * 1024  # small reads: a cut keeps all but the last few KiB
log = logging.getLogger(__name__)


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


# -- an existing dataset, downloaded for another provider's session ---------------------------

def download_input(remote: KaggleRemote, ref: str, dest: Path) -> Path:
    """The files of Kaggle dataset ``ref`` (``owner/slug[@version]``; no version: the current
    one) in ``dest/v<N>/``, downloaded only when that version is not there complete already
    (``v<N>.done`` is written last). A cut download resumes by HTTP Range; every file is
    checked against the zip's CRC-32 and the zip against its length as it is unpacked.

    Raises InputUnavailable when the dataset or version does not exist or is not readable
    by this account; ProviderError when the download keeps failing."""
    owner, slug = ref.partition("@")[0].split("/")
    wanted = ref.partition("@")[2]
    version = int(wanted) if wanted else remote.dataset_version(owner, slug)
    if version is None:
        raise _gone(ref)
    folder, done = dest / f"v{version}", dest / f"v{version}.done"
    if done.exists() and folder.is_dir():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    packed = dest / f"v{version}.zip.partial"
    try:
        _fetch_zip(remote, f"{owner}/{slug}", version, packed)
    except RemoteNotFound:
        raise _gone(ref) from None
    _unpack(packed, folder, ref)
    done.write_text(json.dumps({"ref": f"{owner}/{slug}", "version": version}))
    packed.unlink()
    return folder


def _gone(ref: str) -> InputUnavailable:
    return InputUnavailable("kaggle", f"Kaggle dataset {ref} does not exist or is not readable "
                                      "by the configured account")


def _fetch_zip(remote: KaggleRemote, ref: str, version: int, target: Path) -> None:
    owner, slug = ref.split("/")
    response = remote.open_dataset_zip(owner, slug, version)
    url, total = response.url, int(response.headers.get("Content-Length") or 0)
    ranges = response.headers.get("Accept-Ranges") == "bytes"
    have = target.stat().st_size if ranges and target.exists() else 0
    if have:  # an earlier download of this version was cut: go on from where it stopped
        response.close()
        response, url = _resume(remote, ref, version, url, have)
    with progress_bar(f"downloading {ref}", total) as advance:
        advance(have)
        for cut in range(remote.config.max_retries + 1):
            have, whole = _append(response, target, have, advance)
            if whole and (not total or have == total):
                return
            if not ranges:
                break
            remote.sleep(min(remote.config.backoff_max, remote.config.backoff_base * 2 ** cut))
            response, url = _resume(remote, ref, version, url, have)
    raise ProviderError("kaggle", f"the download of {ref} (version {version}) kept being cut "
                                  f"({have} of {total or '?'} bytes); the next attempt resumes it")


def _resume(remote: KaggleRemote, ref: str, version: int, url: str, have: int) -> tuple[Any, str]:
    """The rest of the zip from byte ``have`` on, and the signed URL it came from: the one
    used so far, or a fresh one when that has expired (signed URLs answer 403 then)."""
    try:
        return remote.open_range(url, have), url
    except RemoteNotFound:
        owner, slug = ref.split("/")
        fresh = remote.open_dataset_zip(owner, slug, version)
        fresh.close()
        return remote.open_range(fresh.url, have), fresh.url


def _append(response: Any, target: Path, have: int, advance: Callable[[int], None]) -> tuple[int, bool]:
    """Write ``response``'s body after the ``have`` bytes of ``target``; returns the bytes now
    held and whether the body arrived whole."""
    import requests

    if have and response.status_code != 206:  # the server sent everything again
        have = 0
    try:
        with response, open(target, "ab" if have else "wb") as out:
            for chunk in response.iter_content(STREAM_CHUNK):
                out.write(chunk)
                have += len(chunk)
                advance(len(chunk))
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
        log.info("kaggle: download cut after %d bytes (%s); resuming", have, type(err).__name__)
        return have, False
    return have, True


def _unpack(packed: Path, folder: Path, ref: str) -> None:
    """Unpack into ``folder`` (read-only files); zipfile checks every file's CRC-32."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(packed) as archive:
            archive.extractall(staging)
    except (zipfile.BadZipFile, OSError) as err:
        packed.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise ProviderError("kaggle", f"the download of {ref} is damaged ({err}); the next "
                                      "attempt downloads it again") from None
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
