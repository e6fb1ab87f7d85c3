"""Reading a finished (or running) session: its log, the runtime's events, its output files.

Output files are downloaded into a fresh temporary folder (the kaggle client would skip files
that exist and write ``<slug>.log`` among them), every checkpoint is verified against its
manifest there, and only then is anything published: a download that breaks midway raises
before a single checkpoint reaches the store.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from gpupool.manifest import ManifestError, list_local, verify_local
from gpupool.runtime import EVENT_PREFIX

from .client import KaggleRemote, OutputFile
from .kernel import SESSION_SUBDIR

CHECKPOINTS = f"{SESSION_SUBDIR}/checkpoints/"
EXIT_FILES = (f"{SESSION_SUBDIR}/exit.json", f"{SESSION_SUBDIR}/started.json")
TAIL_LINES = 20


def log_lines(log_text: str) -> list[str]:
    """The session's output lines from the log (a JSON array of {stream_name, time, data})."""
    try:
        entries = json.loads(log_text) if log_text else []
    except ValueError:
        return log_text.splitlines()
    lines: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            lines += str(entry.get("data", "")).splitlines()
    return lines


def events(lines: list[str]) -> list[dict[str, Any]]:
    """The runtime's structured records (``[gpupool] {...}`` lines)."""
    found = []
    for line in lines:
        if line.startswith(EVENT_PREFIX + "{"):
            try:
                found.append(json.loads(line[len(EVENT_PREFIX):]))
            except ValueError:
                continue
    return found


def progress(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest record with a step, plus the first record's time (when training began)."""
    latest: dict[str, Any] = next((r for r in reversed(records) if r.get("step") is not None), {})
    return {**latest, "first_time": records[0].get("time") if records else None}


def tail(lines: list[str], count: int = TAIL_LINES) -> str:
    plain = [line for line in lines if not line.startswith(EVENT_PREFIX + "{")]
    return "\n".join(plain[-count:])


def safe_name(name: str) -> str | None:
    """The output file's relative path if it stays inside the download folder, else None."""
    norm = posixpath.normpath(name)
    if (not name or name.startswith("/") or "\\" in name or ":" in name or norm != name
            or norm.startswith("..")):
        return None
    return norm


def checkpoint_files(files: list[OutputFile]) -> list[OutputFile]:
    """Output files of complete checkpoints (those whose manifest.json was written)."""
    names = {f.name for f in files}
    complete = {n.rsplit("/", 1)[0] + "/" for n in names
                if n.startswith(CHECKPOINTS) and n.endswith("/manifest.json")}
    return [f for f in files if safe_name(f.name) and any(f.name.startswith(c) for c in complete)]


def fetch(remote: KaggleRemote, files: list[OutputFile], folder: Path) -> None:
    for item in files:
        name = safe_name(item.name)
        if name is None:
            continue
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        remote.download(item.url, target)


def read_exit(remote: KaggleRemote, files: list[OutputFile], scratch: Path) -> dict[str, Any]:
    """exit.json and started.json of the session, merged ({} when the session wrote neither)."""
    wanted = [f for f in files if f.name in EXIT_FILES]
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        fetch(remote, wanted, Path(tmp))
        found: dict[str, Any] = {}
        for name in EXIT_FILES:
            try:
                found[name.rsplit("/", 1)[1]] = json.loads((Path(tmp) / name).read_text())
            except (OSError, ValueError):
                continue
        return found


def verified_checkpoints(root: Path) -> list[tuple[Path, Any]]:
    """(folder, manifest) of every checkpoint under ``root`` that matches its manifest."""
    good = []
    for manifest in reversed(list_local(root)):
        try:
            verify_local(root / manifest.name, manifest)
        except ManifestError:
            continue  # torn or tampered: never published
        if (root / manifest.name).is_dir():
            good.append((root / manifest.name, manifest))
    return good
