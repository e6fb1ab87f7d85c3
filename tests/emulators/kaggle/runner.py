"""Runs a pushed kernel for real: a fake /kaggle, the script in a subprocess, limits, log, outputs.

Layout of the fake root (its path is given to the script as $KAGGLE_ROOT):
  input/datasets/<owner>/<slug>/...        dataset sources ("datasets" layout, the 2026 one)
  input/<slug>/...                         dataset sources ("legacy" layout)
  input/notebooks/<owner>/<kernel-slug>/   kernel sources: that kernel's latest complete output
  working/                                 the cwd; its files become the version's output
  src/script.py                            the pushed code (notebooks: their code cells joined)
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .state import Session

if TYPE_CHECKING:
    from .emulator import KaggleEmulator

POLL_SECONDS = 0.02


def run_session(emu: KaggleEmulator, session: Session) -> None:
    """A session's thread: QUEUED -> RUNNING -> COMPLETE / ERROR / CANCEL_ACKNOWLEDGED."""
    try:
        if _interrupted(emu, session, emu.config.queue_seconds):
            _finish(emu, session, "CANCEL_ACKNOWLEDGED", "", keep_output=False)
            return
        session.root = layout_root(emu, session)
        _start(emu, session)
        outcome, limit = _supervise(emu, session)
        _conclude(emu, session, outcome, limit)
    except Exception as exc:  # noqa: BLE001 - a session must never be left live by an emulator bug
        _finish(emu, session, "ERROR", f"emulator error: {exc!r}", keep_output=False)
    finally:
        session.done.set()


def _interrupted(emu: KaggleEmulator, session: Session, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if session.cancel.wait(POLL_SECONDS) or emu.stopping.is_set():
            return True
    return session.cancel.is_set()


# ---------------------------------------------------------------- the fake /kaggle


def layout_root(emu: KaggleEmulator, session: Session) -> Path:
    root = emu.workdir / "sessions" / str(session.id) / "kaggle"
    (root / "working").mkdir(parents=True)
    (root / "input").mkdir()
    for ref in session.request.get("datasetDataSources", []):
        version = emu.find_dataset_version(ref)
        if version is not None:
            owner, slug = ref.split("/")[:2]
            for target in _input_dirs(emu, root, "datasets", owner, slug):
                _write_dataset(version.files, target)
    for ref in session.request.get("kernelDataSources", []):
        source = emu.find_kernel_output(ref)
        if source is not None:
            owner, slug = ref.split("/")[:2]
            for target in _input_dirs(emu, root, "notebooks", owner, slug):
                _copy_outputs(source, target)
    script = root / "src" / "script.py"
    script.parent.mkdir()
    script.write_text(_source_code(session.request), encoding="utf-8")
    return root


def _input_dirs(emu: KaggleEmulator, root: Path, kind: str, owner: str, slug: str) -> list[Path]:
    layout = emu.config.input_layout
    dirs = []
    if layout in ("datasets", "both"):
        dirs.append(root / "input" / kind / owner / slug)
    if layout in ("legacy", "both"):
        dirs.append(root / "input" / slug)
    return dirs


def _write_dataset(files: dict[str, bytes], target: Path) -> None:
    """Kaggle extracts uploaded archives: `ckpt.zip` appears as the folder `ckpt/`."""
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name.endswith(".zip"):
            zipfile.ZipFile(io.BytesIO(data)).extractall(target / name[: -len(".zip")])
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                archive.extractall(
                    target / name.split(".tar")[0].removesuffix(".tgz"), filter="data"
                )
        else:
            (target / name).write_bytes(data)


def _copy_outputs(source: Session, target: Path) -> None:
    for name, path in source.outputs.items():
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())


def _source_code(request: dict) -> str:
    text = request.get("text", "")
    if request.get("kernelType") != "notebook":
        return text
    cells = json.loads(text).get("cells", [])
    return "\n\n".join(c.get("source", "") for c in cells if c.get("cell_type") == "code")


# ---------------------------------------------------------------- the process


def kernel_env(emu: KaggleEmulator, root: Path) -> dict[str, str]:
    """The parent's env minus every KAGGLE_* variable (no credentials leak in), plus Kaggle's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(KAGGLE_KERNEL_RUN_TYPE="Batch", KAGGLE_ROOT=str(root), PYTHONUNBUFFERED="1")
    env.update(emu.config.extra_env)
    return env


def _start(emu: KaggleEmulator, session: Session) -> None:
    assert session.root is not None
    session.process = subprocess.Popen(
        [emu.config.python, str(session.root / "src" / "script.py")],
        cwd=session.root / "working",
        env=kernel_env(emu, session.root),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    session.started = time.monotonic()
    if not session.cancel.is_set():
        session.status = "RUNNING"
    session.pumps = [
        _pump(session, session.process.stdout, "stdout"),
        _pump(session, session.process.stderr, "stderr"),
    ]


def _pump(session: Session, stream: IO[bytes] | None, name: str) -> threading.Thread:
    def copy() -> None:
        assert stream is not None and session.started is not None
        for line in iter(stream.readline, b""):
            data = line.decode("utf-8", "replace")
            session.log.append(
                {
                    "stream_name": name,
                    "time": round(time.monotonic() - session.started, 3),
                    "data": data,
                }
            )

    thread = threading.Thread(target=copy, name=f"kaggle-emu-{session.id}-{name}", daemon=True)
    thread.start()
    return thread


def _limit(emu: KaggleEmulator, session: Session) -> float:
    timeout = session.request.get("sessionTimeoutSeconds") or float("inf")
    return min(float(timeout), emu.config.session_cap_seconds)


def _supervise(emu: KaggleEmulator, session: Session) -> tuple[str, float]:
    """Wait for the script; kill it on cancel, stop, time limit or exhausted GPU quota."""
    assert session.process is not None and session.started is not None
    while True:
        try:
            session.process.wait(timeout=POLL_SECONDS)
            return "exited", 0.0
        except subprocess.TimeoutExpired:
            pass
        limit = _limit(emu, session)
        outcome = _reason_to_stop(emu, session, limit)
        if outcome:
            kill(session)
            return outcome, limit


def _reason_to_stop(emu: KaggleEmulator, session: Session, limit: float) -> str:
    assert session.started is not None
    if session.cancel.is_set():
        return "cancelled"
    if emu.stopping.is_set():
        return "stopped"
    if time.monotonic() - session.started >= limit:
        return "limit"
    if session.gpu and emu.gpu_seconds_used(session.owner) >= emu.gpu_quota_seconds(session.owner):
        return "quota"
    return ""


def kill(session: Session) -> None:
    """SIGKILL the script and every process it started (also those in their own sessions,
    such as a supervisor's trainer), as Kaggle tears the whole container down at its limits."""
    process = session.process
    if process is None or process.poll() is not None:
        return
    for pid in [process.pid, *_descendants(process.pid)]:
        for send in (os.killpg, os.kill):
            try:
                send(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    process.wait(timeout=5)


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _conclude(emu: KaggleEmulator, session: Session, outcome: str, limit: float) -> None:
    for pump in session.pumps:
        pump.join(timeout=2)
    cfg = emu.config
    assert session.process is not None
    session.exit_code = session.process.returncode
    if outcome == "exited":
        ok = session.exit_code == 0
        message = "" if ok else f"Kernel script exited with code {session.exit_code}"
        _finish(emu, session, "COMPLETE" if ok else "ERROR", message, keep_output=True)
    elif outcome == "limit":
        _finish(
            emu,
            session,
            cfg.limit_status,
            cfg.limit_message.format(limit=limit),
            cfg.limit_keeps_output,
        )
    elif outcome == "quota":
        _finish(
            emu,
            session,
            "ERROR",
            "GPU quota exhausted; the session was stopped",
            cfg.limit_keeps_output,
        )
    elif outcome == "cancelled":
        _finish(emu, session, "CANCEL_ACKNOWLEDGED", "", keep_output=False)
    else:
        _finish(emu, session, "ERROR", "Kaggle emulator stopped", keep_output=False)


def _finish(
    emu: KaggleEmulator, session: Session, status: str, message: str, keep_output: bool
) -> None:
    """Record the end; the status is written last, so pollers never see a final status early."""
    if keep_output and session.root is not None:
        working = session.root / "working"
        session.outputs = {
            p.relative_to(working).as_posix(): p for p in sorted(working.rglob("*")) if p.is_file()
        }
    session.failure_message = message
    with emu.lock:
        session.ended = time.monotonic()
        if session.gpu and session.started is not None:
            emu.charge_finished(session.owner, session.ended - session.started)
        session.status = status
