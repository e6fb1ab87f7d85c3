"""The datasets that carry an attempt's code and checkpoint into its kernel; and an existing
dataset downloaded for a session elsewhere (``download_input``).

* The code: one private dataset per content of (code bundle, gpupool runtime), named by its
  hash (``<prefix>-code-<hash>``, see registry.py). Every attempt whose code did not change,
  of this experiment or another, finds it READY and uploads nothing.
* The checkpoint to resume from: a private dataset of the attempt's own (its kernel's slug),
  made only when there is one, deleted once the attempt is collected (janitor.py).

The archives get a ``.gpupool`` suffix so Kaggle keeps them as files instead of unpacking
them; the kernel unpacks them itself, after checking the code archive's sha256. Kaggle
processes a new dataset asynchronously, so the kernel is pushed only once it reads READY.
What the kernel should do (the marker) is in its own script, not in a dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpupool.bundle import runtime_sources
from gpupool.errors import InputUnavailable, ProviderError, ProviderUnavailable
from gpupool.inputs import progress_bar, reuse_sealed, write_sealed
from gpupool.manifest import sha256_file
from gpupool.provider import Launch

from .client import KaggleRemote, OutcomeUnknown, RemoteNotFound
from .config import KaggleConfig
from .kernel import CHECKPOINT_FILE as CHECKPOINT
from .kernel import CODE_FILE as CODE
from .kernel import RUNTIME_FILE as RUNTIME
from .registry import Registry

FAILED_STATUSES = frozenset({"FAILED", "DELETED"})
STREAM_CHUNK = 64 * 1024  # small reads: a cut keeps all but the last few KiB
Clock = Callable[[], float]
log = logging.getLogger(__name__)


def stage_code(bundle: Path, staging: Path) -> dict[str, str]:
    """Write the code dataset's files into ``staging``: the workdir bundle and gpupool's
    in-session runtime, each as a gzip with no time or name in its header, so the same code
    gives the same bytes (and the same dataset) in every attempt and every experiment.
    Returns each file's sha256, by name."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with gzip.open(bundle, "rb") as source, _quiet_gzip(staging / CODE) as target:
        shutil.copyfileobj(source, target, 1 << 20)
    with _quiet_gzip(staging / RUNTIME) as target, tarfile.open(fileobj=target, mode="w") as tar:
        for name, data in sorted(runtime_sources().items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return {name: sha256_file(staging / name) for name in (CODE, RUNTIME)}


@contextmanager
def _quiet_gzip(path: Path) -> Iterator[gzip.GzipFile]:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=6) as packed:
        yield packed


def code_slug(prefix: str, files: dict[str, str]) -> str:
    """The code dataset's slug, named by its files' hashes (Kaggle allows 6-50 characters)."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return f"{prefix}-code-{digest[:24]}"


def stage_checkpoint(launch: Launch, staging: Path) -> list[tuple[Path, str]]:
    """The checkpoint dataset's one file: the verified checkpoint to resume from, as a tar."""
    assert launch.restore is not None
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    restore = launch.store.download(launch.restore, staging / "restore" / launch.restore.name)
    with tarfile.open(staging / CHECKPOINT, "w") as tar:
        tar.add(restore, arcname=launch.restore.name)
    shutil.rmtree(staging / "restore")
    return [(staging / CHECKPOINT, sha256_file(staging / CHECKPOINT))]



def ship_code(remote: KaggleRemote, config: KaggleConfig, owner: str, registry: Registry,
              launch: Launch, staging: Path, made: list[str],
              clock: Clock = time.monotonic) -> tuple[str, dict[str, str]]:
    """The code dataset of ``launch`` (``owner/slug``) and its files' sha256 by name, uploaded
    only when no dataset holds this code yet; the experiment is recorded as its user. A
    dataset made now is added to ``made`` (deleted again when the push does not happen)."""
    try:
        files = stage_code(launch.bundle, staging)
        slug = code_slug(config.slug_prefix, files)
        registry.use(slug, "code", slug, 1, launch.experiment_id)
        ensure_dataset(remote, config, owner, slug,
                       lambda: [(staging / name, sha) for name, sha in files.items()], made, clock)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"{owner}/{slug}", files


def ship_checkpoint(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
                    launch: Launch, staging: Path, made: list[str],
                    clock: Clock = time.monotonic) -> str | None:
    """The attempt's own checkpoint dataset (``owner/slug``), None when it starts afresh."""
    if launch.restore is None:
        return None
    try:
        ensure_dataset(remote, config, owner, slug, lambda: stage_checkpoint(launch, staging),
                       made, clock)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"{owner}/{slug}"


def ensure_dataset(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
                   files: Callable[[], list[tuple[Path, str]]], made: list[str],
                   clock: Clock = time.monotonic) -> None:
    """Create ``owner/slug`` from ``files()`` (path, sha256) unless it exists, then wait until
    it is READY; ``slug`` is added to ``made`` just before it is created. One that Kaggle
    could not process is deleted and made again.

    Raises ProviderError when Kaggle refuses or fails it, ProviderUnavailable when it is not
    ready within ``dataset_ready_timeout`` seconds."""
    status = remote.dataset_status(owner, slug)
    if status in FAILED_STATUSES:
        remote.delete_dataset(owner, slug)
        status = None
    if status is None:
        tokens = [remote.upload(path, sha256) for path, sha256 in files()]
        made.append(slug)
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


def add_version(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
                tokens: list[str], *, delete_old: bool, clock: Clock = time.monotonic) -> int:
    """Make a new version of ``owner/slug`` from uploaded ``tokens``, wait until it is READY
    and return its number. After an unclear answer the version number (once processing is
    over) says whether it landed: a version is never made twice."""
    before = remote.dataset_version(owner, slug) or 0
    try:
        remote.create_dataset_version(owner, slug, tokens, delete_old=delete_old)
    except OutcomeUnknown:
        wait_ready(remote, config, owner, slug, clock)
        if (remote.dataset_version(owner, slug) or 0) <= before:
            remote.create_dataset_version(owner, slug, tokens, delete_old=delete_old)
    wait_ready(remote, config, owner, slug, clock)
    number = remote.dataset_version(owner, slug)
    if number is None or number <= before:
        raise ProviderError("kaggle", f"Kaggle shows no new version of {owner}/{slug} after "
                                      "making one")
    return number


def wait_ready(remote: KaggleRemote, config: KaggleConfig, owner: str, slug: str,
               clock: Clock = time.monotonic) -> None:
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
    if reuse_sealed(folder, done):
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    packed = dest / f"v{version}.zip.partial"
    try:
        _fetch_zip(remote, f"{owner}/{slug}", version, packed)
    except RemoteNotFound:
        raise _gone(ref) from None
    _unpack(packed, folder, ref)
    write_sealed(done, {"ref": f"{owner}/{slug}", "version": version}, folder)
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
