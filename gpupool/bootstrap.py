"""Run one session: unpack the code, run setup, then the training command under a deadline.

Standard library only: this is what starts inside every session (a local subprocess, a Kaggle
kernel, a Colab notebook). It is the supervisor of the user's command: it forwards SIGTERM,
stops the command at the session's hard end (SIGTERM, then SIGKILL after a grace period), and
records how the command ended in ``exit.json`` so gpupool can tell a finished run from one to
resume, one that failed, and one that was killed.

    python -m gpupool.bootstrap session.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

GRACE_SECONDS = 30.0


def load_config(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def unpack(bundle: Path, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle, "r:*") as tar:
        tar.extractall(workdir, filter="data")


def session_limits(config: dict[str, Any], started: float) -> tuple[float | None, float | None]:
    """(deadline told to the runtime, hard end), counted from when the session really started
    (a queued Kaggle kernel or a notebook opened late must not lose its time)."""
    cap = config.get("session_seconds")
    if cap is None:
        return None, config.get("hard_end")
    margin = config.get("deadline_margin")
    if margin is None:
        margin = min(300.0, 0.1 * float(cap))
    return started + float(cap) - float(margin), started + float(cap)


def session_environment(config: dict[str, Any], deadline: float | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    if deadline is not None:
        env["GPUPOOL_DEADLINE"] = f"{deadline:.3f}"
    paths = [p for p in [config.get("runtime_path"), env.get("PYTHONPATH")] if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_setup(command: str, workdir: Path, env: dict[str, str]) -> int:
    print(f"[gpupool] setup: {command}", flush=True)
    return subprocess.call(["bash", "-c", command], cwd=workdir, env=env)


class Supervisor:
    """Runs the command in its own process group and enforces the hard end of the session."""

    def __init__(self, command: str, workdir: Path, env: dict[str, str], hard_end: float | None):
        self.hard_end = hard_end
        self.process = subprocess.Popen(
            ["bash", "-c", command], cwd=workdir, env=env, start_new_session=True
        )
        self.terminated_at: float | None = None

    def forward_sigterm(self) -> None:
        def _forward(signum: int, frame: Any) -> None:
            self.terminate()

        signal.signal(signal.SIGTERM, _forward)

    def terminate(self) -> None:
        if self.terminated_at is None:
            self.terminated_at = time.time()
            self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, poll: float = 0.2) -> int:
        while True:
            code = self.process.poll()
            if code is not None:
                return code
            now = time.time()
            if self.hard_end is not None and now >= self.hard_end:
                self.terminate()
            if self.terminated_at is not None and now >= self.terminated_at + GRACE_SECONDS:
                self._signal(signal.SIGKILL)
            time.sleep(poll)


def read_outcome(session_dir: Path) -> str | None:
    try:
        return str(json.loads((session_dir / "outcome.json").read_text())["outcome"])
    except (OSError, ValueError, KeyError):
        return None


def main(config_path: str) -> int:
    config = load_config(Path(config_path))
    session_dir = Path(config["session_dir"])
    workdir = session_dir / "code"
    session_dir.mkdir(parents=True, exist_ok=True)
    if not workdir.exists():
        unpack(Path(config["bundle"]), workdir)
    started = time.time()
    deadline, hard_end = session_limits(config, started)
    env = session_environment(config, deadline)
    write_json_atomic(session_dir / "started.json",
                      {"time": started, "pid": os.getpid(), "deadline": deadline})
    code = run_setup(config["setup"], workdir, env) if config.get("setup") else 0
    if code == 0:
        print(f"[gpupool] run: {config['run']}", flush=True)
        supervisor = Supervisor(config["run"], workdir, env, hard_end)
        supervisor.forward_sigterm()
        write_json_atomic(session_dir / "trainer.json", {"pid": supervisor.process.pid})
        code = supervisor.wait()
    else:
        print(f"[gpupool] setup failed with exit code {code}", flush=True)
    result = {"returncode": code, "outcome": read_outcome(session_dir), "started": started,
              "ended": time.time()}
    write_json_atomic(session_dir / "exit.json", result)
    print(f"[gpupool] session ended: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
