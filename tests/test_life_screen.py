"""The quick start as a person sees it: the live line in a pseudo-terminal, plain progress
lines when the output is a pipe, and JSON for scripts. Real subprocesses, real local sessions
of the example MLP (made tiny so each test takes seconds)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import yaml

from tests.helpers import EXAMPLE, TINY_ENV

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def quick_start(tmp: Path, steps: int) -> Path:
    """The README's experiment file, with fewer (and smaller) steps and a short interval."""
    spec = yaml.safe_load((EXAMPLE / "experiment.yaml").read_text())
    spec["workdir"] = str(EXAMPLE)
    spec["env"] = {**spec["env"], **TINY_ENV, "TOTAL_STEPS": str(steps)}
    spec["checkpoint"]["interval"] = "1s"
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def environment(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "GPUPOOL_DATA_DIR": str(tmp / "data"), "GPUPOOL_POLL_INTERVAL": "0.5",
           **extra}
    env.pop("GPUPOOL_CONFIG", None)
    return env


def read_screen(tmp: Path, experiment: Path, limit: float = 240.0) -> list[tuple[float, str]]:
    """Run `gpupool run` in a 160-column pseudo-terminal; the frames drawn, with when."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes gpupool on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "gpupool", "run", str(experiment)],
                  environment(tmp, COLUMNS="160", TERM="xterm"))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    frames, buffer, started = [], "", time.monotonic()
    while time.monotonic() - started < limit:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536).decode(errors="replace")
        except OSError:  # the child closed the terminal: it exited
            break
        buffer += chunk
        for frame in re.split(r"[\r\n]", ANSI.sub("", buffer)):
            if frame.strip() and (not frames or frames[-1][1] != frame):
                frames.append((time.monotonic() - started, frame))
        buffer = buffer[buffer.rfind("\n") + 1:] if "\n" in buffer else buffer[-4096:]
    os.waitpid(pid, 0)
    os.close(fd)
    return frames


def test_quick_start_screen_shows_provider_step_eta_loss_and_last_checkpoint(tmp_path):
    frames = read_screen(tmp_path, quick_start(tmp_path, steps=3000))
    text = [f for _, f in frames]
    wanted = ("on local", "step ", "ETA", "loss", "last checkpoint step")
    full = [f for f in text if all(p in f for p in wanted)]
    assert full, "\n".join(text[-30:])
    steps = [int(m.group(1)) for f in full if (m := re.search(r"step (\d+)/3000", f))]
    assert len(set(steps)) >= 2  # seen at several moments, moving on
    assert any("succeeded" in f for f in text[-5:]), "\n".join(text[-10:])


def test_run_into_a_pipe_prints_plain_progress_lines_at_a_steady_interval(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpupool", "run", str(quick_start(tmp_path, 2500))],
                            env=environment(tmp_path, GPUPOOL_PROGRESS_EVERY="1s"), text=True,
                            capture_output=True, timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout
    progress = [line for line in result.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d .* step \d+", line)]
    assert len(progress) >= 3, result.stdout
    assert "\x1b[" not in result.stdout  # no terminal codes in a log file
    assert "succeeded" in result.stdout.splitlines()[-1]


def test_bad_progress_interval_is_a_clean_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpupool", "run", str(quick_start(tmp_path, 10))],
                            env=environment(tmp_path, GPUPOOL_PROGRESS_EVERY="soon"), text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2 and "GPUPOOL_PROGRESS_EVERY" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_detach_json_then_cancel_json_keep_stdout_machine_readable(tmp_path):
    env = environment(tmp_path)
    path = quick_start(tmp_path, 100_000)
    run = subprocess.run([sys.executable, "-m", "gpupool", "run", "--detach", "--json", str(path)],
                         env=env, text=True, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["state"] == "running" and row["provider"] == "local"
    cancel = subprocess.run([sys.executable, "-m", "gpupool", "cancel", row["id"], "--json"], env=env,
                            text=True, capture_output=True, timeout=120)
    assert cancel.returncode == 0, cancel.stderr
    assert json.loads(cancel.stdout)["state"] == "cancelled"


def test_an_experiments_path_is_merged_into_the_local_sessions_not_dropped(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "show.py").write_text("import os, shutil\nprint('PATH=' + os.environ['PATH'])\n"
                                  "print('found', shutil.which('my-tool'))\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "my-tool").write_text("#!/bin/sh\n")
    (tools / "my-tool").chmod(0o755)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"name": "path-test", "workdir": str(code), "run": "python show.py",
                                    "resources": {"gpu": "none"}, "providers": ["local"],
                                    "limits": {"retries_on_error": 0}, "env": {"PATH": str(tools)}}))
    env = environment(tmp_path)
    subprocess.run([sys.executable, "-m", "gpupool", "run", str(path)], env=env, text=True,
                   capture_output=True, timeout=180)
    log = subprocess.run([sys.executable, "-m", "gpupool", "logs", "path-test"], env=env, text=True,
                         capture_output=True, timeout=60).stdout
    assert f"found {tools / 'my-tool'}" in log, log
    assert "/usr/bin" in log.split("PATH=", 1)[1].splitlines()[0]  # the system's PATH is still there


def gpupool_json(args: list[str], env: dict[str, str]) -> object:
    result = subprocess.run([sys.executable, "-m", "gpupool", *args], env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cancelling_a_real_local_session_keeps_its_checkpoint_and_resume_continues(tmp_path):
    """The issue's case: after `cancel` the experiment showed step 0 and could not go on."""
    env = environment(tmp_path)
    path = quick_start(tmp_path, 1_000_000)
    ident = gpupool_json(["run", "--detach", "--json", str(path)], env)["id"]
    deadline = time.monotonic() + 180
    while not (row := gpupool_json(["status", ident, "--json"], env))["last_checkpoint"]:
        assert time.monotonic() < deadline, row
        subprocess.run([sys.executable, "-m", "gpupool", "daemon", "--once"], env=env,
                       capture_output=True, timeout=120)  # polls the session: sees its checkpoint
    cancelled = gpupool_json(["cancel", ident, "--json"], env)
    assert cancelled["state"] == "cancelled" and cancelled["step"] > 0 and cancelled["last_checkpoint"]
    listed = gpupool_json(["checkpoints", ident, "--json"], env)
    assert listed[0]["latest"] and listed[0]["step"] == cancelled["step"]
    assert gpupool_json(["resume", ident, "--json"], env)["state"] == "pending"
    subprocess.run([sys.executable, "-m", "gpupool", "daemon", "--once"], env=env, capture_output=True,
                   timeout=120)
    resumed = gpupool_json(["status", ident, "--json"], env)
    assert resumed["attempts"][-1]["checkpoint_in"] == cancelled["last_checkpoint"]
    gpupool_json(["cancel", ident, "--json"], env)
