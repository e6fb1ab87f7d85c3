"""How a session ends (issue 12, kinds 4, 5 and 9): who stopped the user's command, what
counts as the user's error, sessions that make no progress, and that nothing of a session
outlives it. Real supervisors and local sessions; every wait is on an event (a file, a
process exit), bounded by a generous timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.provider import classify_exit
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from tests.helpers import ROOT, drive_until_done

Y, L, F, S = AttemptState.YIELDED, AttemptState.LOST, AttemptState.FAILED, AttemptState.SUCCEEDED


# -- classify_exit: the rule -----------------------------------------------------------------

@pytest.mark.parametrize(("returncode", "outcome", "stopped_by", "state", "words"), [
    (0, "done", None, S, "training completed"),
    (0, None, None, S, "exited 0"),
    (1, None, None, F, "exit code 1"),
    (-9, None, None, F, "signal 9 (SIGKILL), which neither gpupool nor the platform sent"),
    (137, None, None, F, "SIGKILL"),  # through a shell that did not exec
    (-15, None, None, F, "SIGTERM"),  # someone else's SIGTERM to the trainer alone
    (75, "yield", None, Y, "yielded (before the session deadline)"),
    (75, "yield", "deadline", Y, "yielded (stopped at the session deadline)"),
    (75, "yield", "signal", Y, "yielded (stopped by a SIGTERM from outside"),
    (-15, None, "deadline", L, "stopped at the session deadline; the run command then ended with "
                               "signal 15 (SIGTERM)"),
    (-9, None, "deadline", L, "stopped at the session deadline"),
    (1, None, "signal", L, "stopped by a SIGTERM from outside the session"),
    (0, None, "signal", L, "exit code 0"),  # stopped, not finished: resume it
    (None, None, None, L, "without an exit status"),
])
def test_a_users_error_is_only_its_command_failing_on_its_own(
    returncode: int | None, outcome: str | None, stopped_by: str | None, state: AttemptState,
    words: str,
) -> None:
    got, message = classify_exit(returncode, outcome, stopped_by)
    assert got == state and words in message, message
    if stopped_by != "deadline":
        assert "stopped at the session deadline" not in message


def test_classify_exit_keeps_its_two_argument_form() -> None:
    assert classify_exit(0, "done") == (S, "training completed")
    assert classify_exit(2, None)[0] == F
    assert classify_exit(-9, None)[0] == F  # stopped_by=None: nobody in gpupool killed it


# -- the supervisor (gpupool.session.bootstrap) ------------------------------------------------------

def wait_for(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_supervisor(tmp: Path, run: str, **config: object) -> tuple[subprocess.Popen, Path]:
    session = tmp / "session"
    (session / "code").mkdir(parents=True)  # already unpacked: no bundle needed
    (session / "session.json").write_text(json.dumps({
        "session_dir": str(session), "bundle": "unused", "run": run, "runtime_path": str(ROOT),
        "env": {"GPUPOOL_SESSION_DIR": str(session)}, **config}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "gpupool.session.bootstrap",
                                str(session / "session.json")], env=env, cwd=session,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return process, session


def ended(process: subprocess.Popen, session: Path) -> dict:
    assert process.wait(timeout=120) == 0
    return json.loads((session / "exit.json").read_text())


def test_supervisor_records_that_it_stopped_the_command_at_the_hard_end(tmp_path: Path) -> None:
    process, session = start_supervisor(tmp_path, "sleep 600", session_seconds=1.0,
                                        deadline_margin=0.5)
    result = ended(process, session)
    assert result["stopped_by"] == "deadline" and result["returncode"] == -signal.SIGTERM
    state, message = classify_exit(result["returncode"], result["outcome"], result["stopped_by"])
    assert state == L and "stopped at the session deadline" in message


def test_supervisor_records_a_sigterm_from_outside(tmp_path: Path) -> None:
    process, session = start_supervisor(tmp_path, "sleep 600")
    wait_for(lambda: (session / "trainer.json").exists(), "the trainer to start")
    process.send_signal(signal.SIGTERM)  # as the platform (or a cancel) does
    result = ended(process, session)
    assert result["stopped_by"] == "signal"
    state, message = classify_exit(result["returncode"], result["outcome"], result["stopped_by"])
    assert state == L and "SIGTERM from outside" in message and "deadline" not in message


def test_a_kill_nobody_in_gpupool_sent_is_the_users_error(tmp_path: Path) -> None:
    process, session = start_supervisor(tmp_path, "python -c 'import os; os.kill(os.getpid(), 9)'")
    result = ended(process, session)
    assert result["stopped_by"] is None and result["returncode"] == -signal.SIGKILL
    assert classify_exit(result["returncode"], result["outcome"], result["stopped_by"])[0] == F


def test_supervisor_kills_what_the_command_left_in_its_group(tmp_path: Path) -> None:
    """Issue 12 (kind 9): DataLoader workers of a SIGKILLed trainer kept running."""
    job = ("import os, subprocess; w = subprocess.Popen(['sleep', '600']); "
           "open('worker.pid', 'w').write(str(w.pid)); os.kill(os.getpid(), 9)")
    process, session = start_supervisor(tmp_path, f'python -c "{job}"')
    ended(process, session)
    worker = int((session / "code" / "worker.pid").read_text())
    wait_for(lambda: not running(worker), "the orphaned worker to die", timeout=10)


# -- local sessions through the scheduler ----------------------------------------------------

def local_pool(tmp: Path, script: str, **limits: int) -> tuple[Pool, str]:
    code = tmp / "code"
    code.mkdir()
    (code / "job.py").write_text(script)
    pool = Pool(PoolSettings(data_dir=tmp / "data",
                             providers={"local": {"gpus": "none", "cancel_grace_seconds": 0.5}}))
    spec = ExperimentSpec.model_validate({
        "name": "job", "workdir": code, "run": "python job.py", "resources": {"gpu": "none"},
        "providers": ["local"], "limits": {"max_hops": 10, **limits},
        "env": {"RECORD": str(tmp / "record.json"), "SEEN": str(tmp / "seen.json")}})
    return pool, pool.submit(spec).id


OOM_AT_60 = """
import os, signal
from gpupool import runtime

session = runtime.session()
step = int((session.restore_dir / "step.txt").read_text()) if session.restore_dir else 0
while step < 1000:
    step += 1
    if step == 50:
        with session.checkpoint(step) as folder:
            (folder / "step.txt").write_text(str(step))
    if step == 60:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
session.complete(step)
"""


def test_a_run_killed_after_its_last_checkpoint_is_not_repeated_forever(tmp_path: Path) -> None:
    """Issue 12 (kind 4): checkpoint at step 50, SIGKILL at step 60 ran 51 attempts, 0 errors."""
    pool, ident = local_pool(tmp_path, OOM_AT_60, retries_on_error=2)
    done = drive_until_done(pool, ident, timeout=120, tick=0.05)
    attempts = pool.state.attempts(ident)
    assert done.state == ExperimentState.FAILED
    assert [a.state for a in attempts] == [F, F, F]
    assert [bool(a.checkpoint_out) for a in attempts] == [True, False, False]
    assert done.failed_attempts == 3
    assert "failed 3 times in a row without a new checkpoint" in (done.message or "")
    assert "SIGKILL" in (done.message or "") and "out-of-memory" in (done.message or "")


WORKERS_THEN_KILLED = """
import json, os, signal, subprocess
from pathlib import Path
from gpupool import runtime

def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

session = runtime.session()
record, seen = Path(os.environ["RECORD"]), Path(os.environ["SEEN"])
if session.restore_dir is None:  # first session: start workers, save, die like an OOM kill
    workers = [subprocess.Popen(["sleep", "600"]),  # in the trainer's process group
               subprocess.Popen(["sleep", "600"], start_new_session=True)]  # left it
    record.write_text(json.dumps([w.pid for w in workers]))
    with session.checkpoint(1) as folder:
        (folder / "state").write_text("1")
    os.kill(os.getpid(), signal.SIGKILL)
seen.write_text(json.dumps([pid for pid in json.loads(record.read_text()) if running(pid)]))
with session.checkpoint(2, final=True) as folder:
    (folder / "state").write_text("2")
session.complete(2)
"""


def test_nothing_of_a_killed_session_runs_when_the_next_one_starts(tmp_path: Path) -> None:
    pool, ident = local_pool(tmp_path, WORKERS_THEN_KILLED)
    done = drive_until_done(pool, ident, timeout=120, tick=0.05)
    assert done.state == ExperimentState.SUCCEEDED, done.message
    assert [a.state for a in pool.state.attempts(ident)] == [F, S]
    assert json.loads((tmp_path / "seen.json").read_text()) == [], "workers outlived their session"


STUBBORN = """
import json, os, signal, subprocess, time
from pathlib import Path

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer that does not stop when asked
worker = subprocess.Popen(["sleep", "600"], start_new_session=True)
Path(os.environ["RECORD"]).write_text(json.dumps([os.getpid(), worker.pid]))
time.sleep(600)
"""


def test_cancel_of_a_local_session_stops_its_whole_process_tree(tmp_path: Path) -> None:
    pool, ident = local_pool(tmp_path, STUBBORN)
    scheduler = Scheduler(pool)
    record = tmp_path / "record.json"

    def started() -> bool:
        scheduler.reconcile_once(time.time())
        return record.exists() and record.read_text().endswith("]")

    wait_for(started, "the session to start")
    pids = json.loads(record.read_text())
    [attempt] = pool.state.attempts(ident)
    supervisor = json.loads((pool.data_dir / "local" / "sessions" / attempt.id / "started.json")
                            .read_text())["pid"]
    done = scheduler.cancel(ident, time.time())
    assert done.failures == [] and done.experiment.state == ExperimentState.CANCELLED
    alive = [pid for pid in [*pids, supervisor] if running(pid)]
    assert alive == [], "cancel said stopped while processes of the session ran"
    assert pool.state.attempt(attempt.id).state == AttemptState.CANCELLED
