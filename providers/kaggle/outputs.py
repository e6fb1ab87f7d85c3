"""A session as it comes back: its log, the runtime's events, its output files, how it ended.

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

from gpupool.lifecycle import AttemptState
from gpupool.manifest import MANIFEST, ManifestError, list_local, verify_local
from gpupool.provider import PollResult, classify_exit
from gpupool.session import contract

from .client import KaggleRemote, KernelStatus, OutputFile
from .kernel import SESSION_SUBDIR

CHECKPOINTS = f"{SESSION_SUBDIR}/{contract.CHECKPOINTS_DIR}/"
EXIT_FILES = (f"{SESSION_SUBDIR}/{contract.EXIT_FILE}", f"{SESSION_SUBDIR}/{contract.STARTED_FILE}")
TAIL_LINES = 20


def log_lines(log_text: str) -> list[str]:
    """The session's output lines from the log (a JSON array of {stream_name, time, data})."""
    try:
        entries = json.loads(log_text) if log_text else []
    except ValueError:
        return log_text.splitlines()
    return entry_lines(entries if isinstance(entries, list) else [])


def entry_lines(entries: list[Any]) -> list[str]:
    """The output lines of log entries ({stream_name, time, data} objects; others skipped)."""
    lines: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            lines += str(entry.get("data", "")).splitlines()
    return lines


def events(lines: list[str]) -> list[dict[str, Any]]:
    """The runtime's structured records (``[gpupool] {...}`` lines)."""
    return [record for record in map(contract.parse_event_line, lines) if record is not None]


def progress(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest record with a step, plus the first record's time (when training began)."""
    latest: dict[str, Any] = next((r for r in reversed(records) if r.get("step") is not None), {})
    return {**latest, "first_time": records[0].get("time") if records else None}


def tail(lines: list[str], count: int = TAIL_LINES) -> str:
    plain = [line for line in lines if contract.parse_event_line(line) is None]
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
                if n.startswith(CHECKPOINTS) and n.endswith("/" + MANIFEST)}
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


def ending(remote: KaggleRemote, status: KernelStatus, files: list[OutputFile], lines: list[str],
           seen: dict[str, Any], scratch: Path) -> PollResult:
    """How a session Kaggle reports as ended (COMPLETE, ERROR, CANCEL_ACKNOWLEDGED) ended.

    A user error (FAILED) is only what the session's own exit.json says; a session that Kaggle
    ended without one (any failure message, or none) is LOST, with Kaggle's message as it was.
    """
    if status.name == "CANCEL_ACKNOWLEDGED":
        return PollResult(AttemptState.CANCELLED, step=seen.get("step"),
                          message=with_kaggle_message("the Kaggle session was cancelled", status))
    found = read_exit(remote, files, scratch)
    started = (found.get(contract.STARTED_FILE) or {}).get("time") or seen.get("first_time")
    ended = found.get(contract.EXIT_FILE)
    if ended is None:
        state = AttemptState.LOST
        message = with_kaggle_message(f"Kaggle ended the session ({status.name}) before it "
                                      "recorded an exit", status)
    elif ended.get("outcome") == contract.OUTCOME_INPUT_PROBLEM:  # gone or wrong: another try cannot help
        return PollResult(AttemptState.FAILED, started_at=started, final=True,
                          message=f"an input is unusable in the session: {ended.get('message')}")
    else:
        state, message = classify(ended)
        if state in (AttemptState.LOST, AttemptState.YIELDED):
            message = with_kaggle_message(message, status)
    if state == AttemptState.FAILED:
        message += "; log ends with:\n" + tail(lines)
    return PollResult(state, step=seen.get("step"), heartbeat=seen.get("time"),
                      started_at=started, message=message)


def with_kaggle_message(message: str, status: KernelStatus) -> str:
    """``message`` plus Kaggle's own failure message, exactly as Kaggle gave it."""
    return f"{message}; Kaggle said: {status.failure}" if status.failure else message


def classify(ended: dict[str, Any]) -> tuple[AttemptState, str]:
    """classify_exit over the session's exit.json, passing who stopped the command when the
    supervisor recorded it (``stopped_by``: "deadline" or "signal")."""
    stopped_by = ended.get("stopped_by")
    extra = {"stopped_by": stopped_by} if stopped_by is not None else {}
    return classify_exit(ended.get("returncode"), ended.get("outcome"), **extra)
