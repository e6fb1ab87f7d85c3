"""Run one session: unpack the code, run setup, then the training command under a deadline.

Standard library only: this is what starts inside every session (a local subprocess, a Kaggle
kernel, a Colab notebook). It is the supervisor of the user's command: it forwards SIGTERM,
stops the command at the session's hard end (SIGTERM, then SIGKILL after a grace period), and
records how the command ended in ``exit.json`` so gpupool can tell a finished run from one to
resume, one that failed, and one that was killed. The files and names it shares with the
scheduler are those of ``gpupool.session.contract``.

    python -m gpupool.session.bootstrap session.json
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpupool.errors import CheckpointError
from gpupool.session import contract

GRACE_SECONDS = 30.0


def _stop_at(env: dict[str, str], hard_end: float | None, has_folders: bool) -> float | None:
    """When the supervisor stops the command. A script with declared folders is stopped at the
    deadline told to the runtime, so its last snapshot is taken before the session's hard end."""
    deadline = env.get(contract.ENV_DEADLINE)
    if has_folders and deadline:
        return min(float(deadline), hard_end) if hard_end is not None else float(deadline)
    return hard_end


def load_config(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def session_limits(config: dict[str, Any], started: float) -> tuple[float | None, float | None]:
    """(deadline told to the runtime, hard end), epoch seconds. With ``session_seconds`` they
    count from ``started``, when the supervisor really started, and follow the one margin rule
    (``contract.deadline_margin``); otherwise they are the ``deadline`` and ``hard_end`` the
    caller measured from the session's own start (see ``contract.session_config``)."""
    if config.get("session_seconds") is not None:
        return contract.session_deadline(started, config["session_seconds"], config.get("deadline_margin"))
    return config.get("deadline"), config.get("hard_end")


def session_environment(config: dict[str, Any], deadline: float | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    if deadline is not None:
        env[contract.ENV_DEADLINE] = f"{deadline:.3f}"
    paths = [p for p in [config.get("runtime_path"), env.get("PYTHONPATH")] if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_setup(command: str, workdir: Path, env: dict[str, str]) -> int:
    print(f"[gpupool] setup: {command}", flush=True)
    return subprocess.call(["bash", "-c", command], cwd=workdir, env=env)


class Supervisor:
    """Runs the command in its own process group and enforces the hard end of the session.

    ``stopped_by`` records who stopped the command, for ``exit.json``: None (nobody: it ended
    on its own, or a signal from elsewhere such as the OOM killer), STOPPED_BY_DEADLINE (this
    supervisor, at the hard end) or STOPPED_BY_SIGNAL (a SIGTERM it received and forwarded: the
    platform, or a cancel). When the command ends, whatever it left in its process group
    (DataLoader workers) is killed, so nothing of a session outlives it."""

    def __init__(self, command: str, workdir: Path, env: dict[str, str], hard_end: float | None):
        self.hard_end = hard_end
        self.process = subprocess.Popen(
            ["bash", "-c", command], cwd=workdir, env=env, start_new_session=True
        )
        self.terminated_at: float | None = None
        self.stopped_by: str | None = None

    def forward_sigterm(self) -> None:
        def _forward(signum: int, frame: Any) -> None:
            self.terminate(contract.STOPPED_BY_SIGNAL)

        signal.signal(signal.SIGTERM, _forward)

    def terminate(self, by: str = contract.STOPPED_BY_SIGNAL) -> None:
        if self.terminated_at is None:
            self.terminated_at = time.time()
            self.stopped_by = by
            self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, poll: float = 0.2) -> int:
        """Wait for the command (forcing the hard end), then kill what it left in its group."""
        while True:
            code = self.process.poll()
            if code is not None:
                self._signal(signal.SIGKILL)  # its children: nothing of the session outlives it
                return code
            now = time.time()
            if self.hard_end is not None and now >= self.hard_end:
                self.terminate(contract.STOPPED_BY_DEADLINE)
            if self.terminated_at is not None and now >= self.terminated_at + GRACE_SECONDS:
                self._signal(signal.SIGKILL)
            time.sleep(poll)


def read_outcome(session_dir: Path) -> str | None:
    outcome = (contract.read_json(session_dir / contract.OUTCOME_FILE) or {}).get("outcome")
    return None if outcome is None else str(outcome)


def tracker_environment(env: dict[str, str]) -> None:
    """One Weights & Biases run across every session of the experiment: its id derived from
    the experiment's (unless the user set one), resumed when it exists."""
    experiment = env.get(contract.ENV_EXPERIMENT)
    if experiment:
        env.setdefault("WANDB_RUN_ID", re.sub(r"[^A-Za-z0-9_-]", "-", experiment)[:64])
        env.setdefault("WANDB_RESUME", "allow")


def prepare_folders(session_dir: Path, workdir: Path, env: dict[str, str], run: str
                    ) -> tuple[str, Any]:
    """Restore the declared checkpoint/output folders into place and start snapshotting them
    (gpupool.session.snapshot); returns the run command with ``{{resume: ...}}`` resolved, and the
    background snapshotter (None when no folder is declared)."""
    if not (env.get(contract.ENV_CHECKPOINT_PATH) or env.get(contract.ENV_OUTPUTS)):
        return run, None  # a runtime script: nothing more to import or start
    from gpupool.session import snapshot

    folders = snapshot.Folders.from_env(env, workdir)
    if folders is None:
        return run, None
    known, start_step = {}, 0
    if env.get(contract.ENV_RESTORE_DIR):
        restore_dir = Path(env[contract.ENV_RESTORE_DIR])
        known = snapshot.restore_into(folders, restore_dir)
        start_step = snapshot.read_local(restore_dir).step
    resumed = snapshot.restored_checkpoint(folders, known)
    if folders.checkpoint:
        folder = (workdir / folders.checkpoint).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        env[contract.ENV_CHECKPOINT_DIR] = str(folder)
    if resumed:
        env[contract.ENV_RESUMED] = "1"
        print(f"[gpupool] restored {len(known)} file(s) into {', '.join(folders.all())}", flush=True)
    snapper = snapshot.Snapshotter(
        folders, session_dir, keep_last=int(env.get(contract.ENV_KEEP_LAST) or contract.DEFAULT_KEEP_LAST),
        known=known, info={"experiment": env.get(contract.ENV_EXPERIMENT, ""),
                           "attempt": env.get(contract.ENV_ATTEMPT, ""),
                           "provider": env.get(contract.ENV_PROVIDER, "")},
        quiet=float(env.get(contract.ENV_SNAPSHOT_SETTLE) or snapshot.DEFAULT_QUIET), start_step=start_step,
        reported_step=lambda: snapshot.last_reported_step(session_dir),
    )
    interval = float(env.get(contract.ENV_INTERVAL) or contract.DEFAULT_INTERVAL_SECONDS)
    background = snapshot.Background(snapper, interval, session_dir / contract.SNAPSHOT_REQUEST)
    run = snapshot.substitute_resume(run, workdir, folders.checkpoint, resumed)
    return run, background.start()


def main(config_path: str) -> int:
    config = load_config(Path(config_path))
    session_dir = Path(config["session_dir"])
    workdir = session_dir / contract.CODE_DIR
    session_dir.mkdir(parents=True, exist_ok=True)
    if not workdir.exists():
        contract.extract_tar(config["bundle"], workdir)
    started = time.time()
    deadline, hard_end = session_limits(config, started)
    env = session_environment(config, deadline)
    tracker_environment(env)
    contract.write_json_atomic(session_dir / contract.STARTED_FILE,
                               {"time": started, "pid": os.getpid(), "deadline": deadline})
    stopped_by: str | None = None
    try:
        run, snapshots = prepare_folders(session_dir, workdir, env, config["run"])
    except (OSError, ValueError, CheckpointError) as err:  # a failed restore must not train from scratch
        print(f"[gpupool] cannot restore the checkpoint folder: {err}", flush=True)
        run, snapshots, code = config["run"], None, 1
    else:
        code = run_setup(config["setup"], workdir, env) if config.get("setup") else 0
        if code != 0:
            print(f"[gpupool] setup failed with exit code {code}", flush=True)
    if code == 0:
        print(f"[gpupool] run: {run}", flush=True)
        supervisor = Supervisor(run, workdir, env, _stop_at(env, hard_end, snapshots is not None))
        supervisor.forward_sigterm()
        contract.write_json_atomic(session_dir / contract.TRAINER_FILE, {"pid": supervisor.process.pid})
        code = supervisor.wait()
        stopped_by = supervisor.stopped_by
    if snapshots is not None:  # the folders as the trainer left them (only if consistent)
        snapshots.finish(code, time.time(), clean_codes=contract.CLEAN_EXIT_CODES)
    result = {"returncode": code, "outcome": read_outcome(session_dir), "stopped_by": stopped_by,
              "started": started, "ended": time.time()}
    contract.write_json_atomic(session_dir / contract.EXIT_FILE, result)
    print(f"[gpupool] session ended: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
