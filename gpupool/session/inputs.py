"""Bringing inputs into place inside a remote session (standard library only).

The provider hands the session a plan: for each input name, either a mounted dataset folder
(with gpupool's content listing, verified byte for byte before training starts) or a URL to
fetch and verify. ``prepare(plan, locate, scratch)`` returns ``{GPUPOOL_INPUT_<NAME>: path}``.
A problem exits the session with a message naming the input, before the user's command runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpupool.session import contract

CONTENT_FILE = "gpupool-content.json"
PACKED_DIR = "data"  # the uploaded data.tar, unpacked by the service
CHUNK = 1024 * 1024


class InputProblem(Exception):
    """An input is missing or does not match its hash; the message names it. ``transient``:
    it may work on another try (a fetch that failed on the way), so the session is not
    reported as an input problem (which fails the whole run at once)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def prepare(plan: dict[str, dict[str, Any]], locate: Callable[[str], Path | None],
            scratch: Path) -> dict[str, str]:
    """Every input in place and verified; ``locate(ref)`` finds a mounted dataset's folder.

    Raises InputProblem naming the input when one is missing or wrong."""
    env = {}
    for name, item in plan.items():
        if item["kind"] == "dataset":
            path = _dataset_input(name, item, locate)
        elif item["kind"] == "url":
            path = fetch(item["url"], item.get("sha256"), scratch / "inputs" / name)
        else:
            raise InputProblem(f"input {name!r}: unknown kind {item['kind']!r}")
        env[contract.input_env_name(name)] = str(path)
    return env


def _dataset_input(name: str, item: dict[str, Any], locate: Callable[[str], Path | None]) -> Path:
    mount = locate(item["ref"])
    if mount is None:
        raise InputProblem(f"input {name!r}: dataset {item['ref']} is not attached to this "
                           "session (deleted, or not readable by this account)")
    if not item.get("packed"):
        return mount  # an existing dataset: used as the service mounted it
    listing = json.loads((mount / CONTENT_FILE).read_text())
    data = mount / PACKED_DIR
    verify(data, listing, name)
    files = listing["files"]
    return data if listing["is_dir"] else data / files[0][0]


def verify(root: Path, listing: dict[str, Any], name: str) -> None:
    """Every listed file exists with its size and sha256."""
    for rel, size, sha256 in listing["files"]:
        path = root / rel
        if not path.is_file() or path.stat().st_size != size:
            raise InputProblem(f"input {name!r}: {rel} is missing or has the wrong size")
        if _sha256(path) != sha256:
            raise InputProblem(f"input {name!r}: {rel} does not match its sha256")


def fetch(url: str, sha256: str | None, folder: Path) -> Path:
    """Download ``url`` into ``folder``, verify it, make it read-only; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "download")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as answer, open(target, "wb") as out:
            while chunk := answer.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        raise InputProblem(f"cannot fetch {url}: {err}", transient=True) from None
    if sha256 is not None and digest.hexdigest() != sha256:
        target.unlink()
        raise InputProblem(f"{url} has sha256 {digest.hexdigest()}, not {sha256}")
    os.chmod(target, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
