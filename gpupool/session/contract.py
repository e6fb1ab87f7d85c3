"""The contract between the scheduler and a session, written once (standard library only).

Everything a session and the scheduler must agree on lives here, so no other file types it
again: the ``GPUPOOL_*`` environment variables, the files of a session folder, the exit code
of a yield, the deadline rule, the runtime's event lines, atomic JSON writes and the one safe
tar extraction. As SkyPilot keeps ``sky/skylet/constants.py`` beside its on-node agent.

This module runs in three places, so it imports the standard library only and needs no
``from __future__`` (its annotations are valid at run time on Python 3.10): the installed
gpupool, the runtime shipped into a session, and the Colab notebook, which carries its source
as a cell before the runtime is downloaded (``gpupool_providers.colab.notebook``).

A session folder holds::

    session.json    SESSION_CONFIG   what the supervisor runs (``session_config``)
    started.json    STARTED_FILE     the supervisor started: {"time", "pid", "deadline"}
    trainer.json    TRAINER_FILE     the user's command runs: {"pid"}
    outcome.json    OUTCOME_FILE     the runtime's word: {"outcome": "done"|"yield", "step", "time"}
    exit.json       EXIT_FILE        how the command ended: {"returncode", "outcome", "stopped_by",
                                     "started", "ended"}, or {"outcome": "input-problem", "message"}
    events.jsonl    EVENTS_FILE      the runtime's records, one JSON object a line
    snapshot.request                 a trainer's ask for a folder snapshot (its mtime counts)
    checkpoints/    CHECKPOINTS_DIR  ``ckpt-*`` folders, manifest last (``gpupool.manifest``)
    code/           CODE_DIR         the experiment's workdir, unpacked
"""

import json
import os
import tarfile
from pathlib import Path
from typing import Any

# -- environment variables: set by the scheduler (``gpupool.provider.runtime_env``) and the
# supervisor, read by ``gpupool.runtime`` and the supervisor --------------------------------

ENV_EXPERIMENT = "GPUPOOL_EXPERIMENT"
ENV_ATTEMPT = "GPUPOOL_ATTEMPT"
ENV_PROVIDER = "GPUPOOL_PROVIDER"
ENV_SESSION_DIR = "GPUPOOL_SESSION_DIR"
ENV_RESTORE_DIR = "GPUPOOL_RESTORE_DIR"  # the verified checkpoint to resume from
ENV_DEADLINE = "GPUPOOL_DEADLINE"  # epoch seconds: save and yield before this
ENV_INTERVAL = "GPUPOOL_CHECKPOINT_INTERVAL"  # seconds between checkpoints
ENV_KEEP_LAST = "GPUPOOL_KEEP_LAST"
ENV_LOG_EVENTS = "GPUPOOL_LOG_EVENTS"  # "1": events are printed too (the log is all Kaggle returns)
# Bring-your-own scripts (see gpupool.session.snapshot): the folder the trainer checkpoints
# into, as an absolute path in the session, and "1" only when a checkpoint was restored into it.
ENV_CHECKPOINT_DIR = "GPUPOOL_CHECKPOINT_DIR"
ENV_RESUMED = "GPUPOOL_RESUMED"
# What the experiment file declares, handed to the session's supervisor (relative to the workdir).
ENV_CHECKPOINT_PATH = "GPUPOOL_CHECKPOINT_PATH"
ENV_OUTPUTS = "GPUPOOL_OUTPUTS"  # a JSON list of folders
ENV_SNAPSHOT_SETTLE = "GPUPOOL_SNAPSHOT_SETTLE"  # seconds the checkpoint folder must be unchanged
ENV_INPUT_PREFIX = "GPUPOOL_INPUT_"  # + the input's name in capitals: where that input is

DEFAULT_INTERVAL_SECONDS = 600.0  # when ENV_INTERVAL is not set
DEFAULT_KEEP_LAST = 3  # when ENV_KEEP_LAST is not set


def input_env_name(name: str) -> str:
    """The variable holding input ``name``'s path in the session (``GPUPOOL_INPUT_<NAME>``)."""
    return ENV_INPUT_PREFIX + name.upper()


# -- the session folder ----------------------------------------------------------------------

SESSION_CONFIG = "session.json"
STARTED_FILE = "started.json"
TRAINER_FILE = "trainer.json"
OUTCOME_FILE = "outcome.json"
EXIT_FILE = "exit.json"
EVENTS_FILE = "events.jsonl"
SNAPSHOT_REQUEST = "snapshot.request"
CHECKPOINTS_DIR = "checkpoints"
CODE_DIR = "code"

# -- how a session ends ----------------------------------------------------------------------

EXIT_YIELD = 75  # EX_TEMPFAIL: "stopped on purpose, resume me"
CLEAN_EXIT_CODES = (0, EXIT_YIELD)  # the command left its folders as it meant to
OUTCOME_DONE = "done"  # outcome.json: training is finished
OUTCOME_YIELD = "yield"  # outcome.json: saved and stopped on purpose
# exit.json "outcome" (Kaggle) and status.json "state" (Colab) when an input is missing or
# wrong in the session, with its "message": the run fails at once, no retry can help
OUTCOME_INPUT_PROBLEM = "input-problem"
STOPPED_BY_DEADLINE = "deadline"  # exit.json "stopped_by": the supervisor, at the hard end
STOPPED_BY_SIGNAL = "signal"  # ...a SIGTERM the supervisor received and forwarded


def ended_cleanly(exit_record: dict[str, Any]) -> bool:
    """Whether ``exit.json`` says the command finished or yielded (a session to report as a
    success to its platform, e.g. the Kaggle kernel's own exit status)."""
    return (exit_record.get("outcome") in (OUTCOME_DONE, OUTCOME_YIELD)
            or exit_record.get("returncode") in CLEAN_EXIT_CODES)


# -- the deadline ----------------------------------------------------------------------------

DEFAULT_MARGIN_SECONDS = 600.0  # at most this long before the cap is kept for the last checkpoint
DEFAULT_MARGIN_FRACTION = 0.1  # ...and at most this share of a short session


def deadline_margin(cap_seconds: float | None, configured: float | None = None) -> float:
    """Seconds before a session's hard end at which the trainer is told to save and stop.

    ``configured`` (the provider's ``deadline_margin``, seconds) wins when given; otherwise
    min(600 s, 10 % of the cap), so a 12-hour session keeps 10 minutes for its last checkpoint
    and upload and a 20-minute one keeps 2. A session with no cap (``None``) has no margin.
    """
    if configured is not None:
        return float(configured)
    if cap_seconds is None:
        return 0.0
    return min(DEFAULT_MARGIN_SECONDS, DEFAULT_MARGIN_FRACTION * float(cap_seconds))


def session_deadline(started: float, cap_seconds: float | None, configured_margin: float | None = None
                     ) -> tuple[float | None, float | None]:
    """(deadline told to the runtime, hard end), epoch seconds, for a session that really
    started at ``started`` (a queued kernel or a notebook opened late must not lose its time)
    and may run ``cap_seconds``; (None, None) when it has no cap."""
    if cap_seconds is None:
        return None, None
    hard_end = started + float(cap_seconds)
    return hard_end - deadline_margin(cap_seconds, configured_margin), hard_end


# -- what the supervisor is told (session.json) ----------------------------------------------

def session_config(*, session_dir: str, bundle: str, run: str, env: dict[str, str],
                   setup: str | None = None, runtime_path: str | None = None,
                   session_seconds: float | None = None, deadline_margin: float | None = None,
                   deadline: float | None = None, hard_end: float | None = None) -> dict[str, Any]:
    """``session.json`` for ``python -m gpupool.session.bootstrap``.

    Give either ``session_seconds`` (and optionally ``deadline_margin``), counted from the
    supervisor's start, or the ``deadline`` and ``hard_end`` (epoch seconds) of a session whose
    start the caller measured; neither: no deadline. ``env`` holds the session's variables,
    ``runtime_path`` the folder put first on ``PYTHONPATH`` (the shipped runtime)."""
    return {"session_dir": session_dir, "bundle": bundle, "setup": setup, "run": run, "env": env,
            "runtime_path": runtime_path, "session_seconds": session_seconds,
            "deadline_margin": deadline_margin, "deadline": deadline, "hard_end": hard_end}


# -- the runtime's events (events.jsonl, and ``[gpupool] {...}`` log lines) -------------------

EVENT_PREFIX = "[gpupool] "
EVENT_PROGRESS = "progress"  # {"step", "total", "metrics"}: Session.report()
EVENT_CHECKPOINT = "checkpoint"  # {"step", "name", "bytes"}: a checkpoint published in the session
EVENT_TAIL_BYTES = 64 * 1024  # the newest events are read from this much of the file's end


def event_line(record: dict[str, Any]) -> str:
    """An event as the one JSON line written to events.jsonl (without the newline)."""
    return json.dumps(record, default=str)


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The record of a ``[gpupool] {...}`` log line (printed when ENV_LOG_EVENTS is "1"), or
    None for any other line, or a torn one."""
    if not line.startswith(EVENT_PREFIX + "{"):
        return None
    try:
        record = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def last_event(session_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The newest event with a step in the session's events.jsonl ({} when none): of ``kind``
    ("progress", "checkpoint", ...), or of any kind when None. Reads only the file's tail, so
    it stays cheap however long the session ran."""
    path = Path(session_dir) / EVENTS_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - EVENT_TAIL_BYTES))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first line of the tail is usually cut
        if isinstance(record, dict) and record.get("step") is not None \
                and (kind is None or record.get("event") == kind):
            return record
    return {}


# -- files -----------------------------------------------------------------------------------

def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so a reader sees the old file or the new one, never half of it
    (a temporary file beside it, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A session file's content, or None while it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def extract_tar(archive: str | Path, target: str | Path) -> Path:
    """Unpack a .tar(.gz) into ``target`` with tarfile's "data" filter (no absolute paths,
    no links or paths leaving ``target``, no device files); returns ``target``. Raises
    ``tarfile.TarError`` (a bad or refused member) or ``OSError``.

    Pythons older than 3.10.12 / 3.11.4 (Debian 12 ships 3.11.2) have no filters: there the
    same members are refused by hand before anything is written (one function, because the
    Kaggle script carries a copy of it)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
            return target
        root = os.path.realpath(target)
        for member in tar.getmembers():
            where = os.path.realpath(os.path.join(root, member.name))
            linked = os.path.join(os.path.dirname(where) if member.issym() else root, member.linkname)
            leaves = [where] + ([os.path.realpath(linked)] if member.issym() or member.islnk() else [])
            if (os.path.isabs(member.name) or not (member.isfile() or member.isdir() or member.issym()
                                                   or member.islnk())
                    or (member.issym() and os.path.isabs(member.linkname))
                    or any(os.path.commonpath([root, path]) != root for path in leaves)):
                raise tarfile.TarError(f"refused archive member {member.name!r}: it leaves "
                                       f"{target} or is not a plain file, folder or link")
        tar.extractall(target)
    return target
