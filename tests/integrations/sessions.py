"""Run an example script as a chain of gpupool sessions in fresh processes, each restored from the
checkpoint folder the previous one left, as the session supervisor does between hops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HARNESS = Path(__file__).with_name("harness.py")
REPO = HARNESS.parents[2]
WAIT_SECONDS = 240  # a bound for a hung subprocess, not a guess at how long it takes


@dataclass
class Ran:
    returncode: int
    session_dir: Path
    workdir: Path
    output: str


def run_session(root: Path, name: str, which: str, env: dict[str, str], *, restore: Path | None = None,
                checkpoint: str = "checkpoints", sigterm_at: int | None = None,
                deadline_at: int | None = None) -> Ran:
    """One session in ``root/name``: the checkpoint folder of ``restore`` (a previous workdir)
    copied into place, then the harness run until it exits. ``sigterm_at``: the test sends
    SIGTERM once the script reached that step; ``deadline_at``: the deadline comes at that step."""
    session_dir, workdir = root / name / "session", root / name / "code"
    workdir.mkdir(parents=True)
    full_env = {**os.environ, **env, "GPUPOOL_EXPERIMENT": "integration-test", "GPUPOOL_ATTEMPT": name,
                "GPUPOOL_SESSION_DIR": str(session_dir), "HF_HUB_OFFLINE": "1",
                "GPUPOOL_CHECKPOINT_DIR": str(workdir / checkpoint), "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1"}
    if restore is not None:
        shutil.copytree(restore / checkpoint, workdir / checkpoint)
        full_env["GPUPOOL_RESUMED"] = "1"
    if sigterm_at is not None:
        full_env["GATE_SIGTERM_AT"] = str(sigterm_at)
    if deadline_at is not None:
        full_env["GATE_DEADLINE_AT"] = str(deadline_at)
    process = subprocess.Popen([sys.executable, str(HARNESS), which], cwd=workdir, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if sigterm_at is not None:
        wait_for_file(session_dir / "gate", process)
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=WAIT_SECONDS)
    return Ran(process.returncode, session_dir, workdir, output)


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    """Wait until the script signals it reached the gate (or died trying)."""
    limit = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the script ended ({process.returncode}) before the gate:\n"
                                 + process.stdout.read()[-3000:])
        if time.monotonic() > limit:
            process.kill()
            raise AssertionError("the script never reached the gate")
        time.sleep(0.02)
