"""The in-session runtime: defaults, deadline and SIGTERM, atomic checkpoints (also in the
background and under SIGKILL), restore order, retention, progress rate, yielding, light import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gpupool import runtime
from gpupool.clock import SYSTEM_CLOCK, Clock, ManualClock
from gpupool.manifest import MANIFEST, PREFIX, list_local, read_local, verify_local
from gpupool.runtime import EXIT_YIELD, Session

REPO = Path(__file__).resolve().parents[1]


def make_session(tmp_path: Path, clock: Clock = SYSTEM_CLOCK, **env: str) -> Session:
    base = {runtime.ENV_SESSION_DIR: str(tmp_path / "session")}
    base.update(env)
    return Session(env=base, install_sigterm=False, clock=clock)


def events(session: Session, kind: str | None = None) -> list[dict]:
    path = session.session_dir / "events.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if kind is None or r["event"] == kind]


def save(session: Session, step: int, payload: bytes = b"weights") -> str:
    with session.checkpoint(step) as folder:
        (folder / "state.bin").write_bytes(payload + str(step).encode())
    return list_local(session.checkpoint_root)[0].name


# -- environment ---------------------------------------------------------------------------


def test_no_environment_means_standalone_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = Session(env={}, install_sigterm=False)
    assert (session.experiment, session.attempt, session.provider) == ("standalone",) * 3
    assert session.session_dir == tmp_path / "gpupool-session"
    assert session.session_dir.is_dir()
    assert session.checkpoint_root == session.session_dir / "checkpoints"
    assert session.deadline is None and session.seconds_left() is None
    assert session.restore_dir is None and session.restore_manifest is None
    assert session.interval == 600 and session.keep_last == 3
    assert not session.should_stop()


def test_environment_is_read(tmp_path):
    deadline = time.time() + 3600
    restore = tmp_path / "restore"
    session = make_session(
        tmp_path, GPUPOOL_EXPERIMENT="exp-1", GPUPOOL_ATTEMPT="exp-1-a2", GPUPOOL_PROVIDER="kaggle",
        GPUPOOL_DEADLINE=str(deadline), GPUPOOL_CHECKPOINT_INTERVAL="120", GPUPOOL_KEEP_LAST="5",
        GPUPOOL_RESTORE_DIR=str(restore),
    )
    assert (session.experiment, session.attempt, session.provider) == ("exp-1", "exp-1-a2", "kaggle")
    assert session.deadline == deadline and session.interval == 120 and session.keep_last == 5
    assert session.restore_dir == restore
    assert 3500 < session.seconds_left() <= 3600


# -- stopping ------------------------------------------------------------------------------


def test_should_stop_at_deadline(tmp_path):
    future = make_session(tmp_path, GPUPOOL_DEADLINE=str(time.time() + 3600))
    assert not future.should_stop()
    past = make_session(tmp_path, GPUPOOL_DEADLINE=str(time.time() - 1))
    assert past.should_stop()
    assert past.seconds_left() == 0.0


def test_deadline_is_read_from_the_injected_clock(tmp_path):
    clock = ManualClock()
    session = make_session(tmp_path, clock, GPUPOOL_DEADLINE=str(clock() + 600))
    assert session.seconds_left() == 600 and not session.should_stop()
    clock.advance(599)
    assert session.seconds_left() == 1 and not session.should_stop()
    clock.advance(1)
    assert session.should_stop() and session.seconds_left() == 0.0


def test_should_stop_leaves_room_for_the_measured_save(tmp_path):
    clock = ManualClock()
    session = make_session(tmp_path, clock, GPUPOOL_DEADLINE=str(clock() + 100))
    assert not session.should_stop()
    with session.checkpoint(1) as folder:
        (folder / "model.pt").write_bytes(b"weights")
        clock.advance(40)  # the save takes 40 s: with 60 s left there is no room for another
    assert session.should_stop()
    assert read_local(session.checkpoint_root / list_local(session.checkpoint_root)[0].name) \
        .metadata["save_seconds"] == 40


def test_checkpoint_due_after_interval(tmp_path):
    clock = ManualClock()
    session = make_session(tmp_path, clock, GPUPOOL_CHECKPOINT_INTERVAL="3600")
    assert not session.checkpoint_due()
    clock.advance(3599)
    assert not session.checkpoint_due()
    clock.advance(1)
    assert session.checkpoint_due()
    save(session, 1)  # a checkpoint starts the interval again
    assert not session.checkpoint_due()
    short = make_session(tmp_path, GPUPOOL_CHECKPOINT_INTERVAL="0")
    assert short.checkpoint_due()


def test_records_carry_the_injected_clocks_time(tmp_path):
    clock = ManualClock(start=1_900_000_000.0)
    session = make_session(tmp_path, clock)
    session.event("hello")
    session.complete(5)
    assert events(session, "hello")[0]["time"] == 1_900_000_000.0
    assert json.loads((session.session_dir / "outcome.json").read_text())["time"] == 1_900_000_000.0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_sigterm_sets_the_stop_flag(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        session = Session(env={runtime.ENV_SESSION_DIR: str(tmp_path / "s")}, install_sigterm=True)
        assert not session.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if session.should_stop():
                break
            time.sleep(0.001)
        assert session.should_stop()
        assert events(session, "sigterm")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_handler_not_installed_off_the_main_thread(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    made: list[Session] = []
    thread = threading.Thread(
        target=lambda: made.append(Session(env={runtime.ENV_SESSION_DIR: str(tmp_path / "s")}))
    )
    thread.start()
    thread.join()
    assert made and signal.getsignal(signal.SIGTERM) is previous


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_publishes_a_complete_directory(tmp_path):
    session = make_session(tmp_path, GPUPOOL_EXPERIMENT="e", GPUPOOL_ATTEMPT="e-a1",
                           GPUPOOL_PROVIDER="local")
    with session.checkpoint(12, loss=0.25) as folder:
        assert not list_local(session.checkpoint_root)  # invisible while being written
        (folder / "model.bin").write_bytes(b"m" * 1000)
        (folder / "opt").mkdir()
        (folder / "opt" / "state.bin").write_bytes(b"o" * 10)
    [manifest] = list_local(session.checkpoint_root)
    directory = session.checkpoint_root / manifest.name
    assert manifest.name.startswith(PREFIX) and (directory / MANIFEST).is_file()
    assert manifest.step == 12 and manifest.metadata["loss"] == 0.25
    assert manifest.metadata["save_seconds"] >= 0  # the save cost, for the automatic interval
    assert (manifest.experiment, manifest.attempt, manifest.provider) == ("e", "e-a1", "local")
    assert sorted(f.path for f in manifest.files) == ["model.bin", "opt/state.bin"]
    verify_local(directory, manifest)
    assert not folder.exists()  # staging was moved, nothing left behind
    assert [p.name for p in session.session_dir.iterdir() if p.name.startswith(".staging")] == []
    [record] = events(session, "checkpoint")
    assert record["name"] == manifest.name and record["bytes"] == 1010
    assert session.restore_dir == directory and session.restore_manifest == manifest


def test_exception_inside_checkpoint_publishes_nothing(tmp_path):
    session = make_session(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"), session.checkpoint(3) as folder:
        (folder / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("disk full")
    assert list_local(session.checkpoint_root) == []
    assert not folder.exists()
    assert session.restore_dir is None
    assert events(session, "checkpoint") == []


def test_restore_prefers_own_newest_checkpoint(tmp_path):
    given = tmp_path / "brought-in"
    given.mkdir()
    session = make_session(tmp_path, GPUPOOL_RESTORE_DIR=str(given))
    assert session.restore_dir == given
    save(session, 5)
    newest = save(session, 9)
    with session.checkpoint(7) as folder:  # a lower step published later is not "newest"
        (folder / "f").write_bytes(b"7")
    assert session.restore_dir == session.checkpoint_root / newest
    assert read_local(session.restore_dir).step == 9


def test_keep_last_prunes_old_checkpoints(tmp_path):
    session = make_session(tmp_path, GPUPOOL_KEEP_LAST="2")
    for step in range(1, 6):
        save(session, step)
    assert [m.step for m in list_local(session.checkpoint_root)] == [5, 4]
    assert sorted(p.name for p in session.checkpoint_root.iterdir()) == \
        sorted(m.name for m in list_local(session.checkpoint_root))


def test_report_writes_at_most_once_per_interval(tmp_path):
    clock = ManualClock()
    session = make_session(tmp_path, clock)
    for step in range(50):
        session.report(step, total=100, loss=1.0)
    clock.advance(runtime.PROGRESS_EVERY * 0.5)
    session.report(60, total=100)
    assert [e["step"] for e in events(session, "progress")] == [0]
    clock.advance(runtime.PROGRESS_EVERY * 0.6)
    session.report(70, total=100, loss=0.5)
    progress = events(session, "progress")
    assert [e["step"] for e in progress] == [0, 70]
    assert progress[-1]["total"] == 100 and progress[-1]["metrics"] == {"loss": 0.5}


def test_events_are_printed_when_asked(tmp_path, capsys):
    session = make_session(tmp_path, GPUPOOL_LOG_EVENTS="1")
    session.event("hello", value=1)
    out = capsys.readouterr().out
    assert out.startswith(runtime.EVENT_PREFIX)
    assert json.loads(out[len(runtime.EVENT_PREFIX):])["value"] == 1


def test_background_checkpoint_publishes(tmp_path):
    session = make_session(tmp_path)
    release = threading.Event()

    def write(folder: Path) -> None:
        release.wait(5)
        (folder / "state.bin").write_bytes(b"background")

    session.checkpoint_in_background(8, write, note="bg")
    assert list_local(session.checkpoint_root) == []  # not visible while writing
    release.set()
    session.wait_for_background()
    [manifest] = list_local(session.checkpoint_root)
    assert manifest.step == 8 and manifest.metadata["note"] == "bg"
    verify_local(session.checkpoint_root / manifest.name, manifest)


def test_background_error_publishes_nothing_and_is_reraised(tmp_path):
    session = make_session(tmp_path)
    save(session, 1)

    def write(folder: Path) -> None:
        (folder / "partial.bin").write_bytes(b"x" * 100)
        raise OSError("no space left")

    session.checkpoint_in_background(2, write)
    with pytest.raises(OSError, match="no space left"):
        session.wait_for_background()
    assert [m.step for m in list_local(session.checkpoint_root)] == [1]
    assert [p for p in session.session_dir.iterdir() if p.name.startswith(".staging")] == []
    session.wait_for_background()  # raised once only


def test_next_checkpoint_waits_for_background_and_raises_its_error(tmp_path):
    session = make_session(tmp_path)
    session.checkpoint_in_background(2, lambda folder: 1 / 0)
    with pytest.raises(ZeroDivisionError), session.checkpoint(3) as folder:
        (folder / "f").write_bytes(b"x")
    assert list_local(session.checkpoint_root) == []


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from gpupool.runtime import Session
    session = Session(env={"GPUPOOL_SESSION_DIR": sys.argv[1]}, install_sigterm=False)
    with session.checkpoint(1) as folder:
        (folder / "state.bin").write_bytes(b"good")
    marker = sys.argv[2]

    def write(folder):
        with open(folder / "big.bin", "wb") as handle:
            for i in range(10000):
                handle.write(b"x" * 65536)
                handle.flush()
                if i == 3:
                    open(marker, "w").close()
                time.sleep(0.01)

    session.checkpoint_in_background(2, write)
    session.wait_for_background()
    """
)


def test_sigkill_during_background_write_leaves_no_visible_checkpoint(tmp_path):
    session_dir, marker = tmp_path / "child-session", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(session_dir), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "child never started writing"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    root = session_dir / "checkpoints"
    visible = list_local(root)
    assert [m.step for m in visible] == [1]
    verify_local(root / visible[0].name, visible[0])
    staging = [p for p in session_dir.iterdir() if p.name.startswith(".staging")]
    assert staging and (staging[0] / "big.bin").stat().st_size > 0  # the torn write exists...
    assert all(p.name.startswith(PREFIX) for p in root.iterdir())  # ...but never as a ckpt


# -- ending --------------------------------------------------------------------------------


def test_yield_session_exits_75_and_writes_outcome(tmp_path):
    session = make_session(tmp_path)
    with pytest.raises(SystemExit) as info:
        session.yield_session(42)
    assert info.value.code == EXIT_YIELD == 75
    outcome = json.loads((session.session_dir / "outcome.json").read_text())
    assert outcome["outcome"] == "yield" and outcome["step"] == 42
    assert events(session, "yield")[0]["step"] == 42


def test_complete_writes_done(tmp_path):
    session = make_session(tmp_path)
    session.complete(100, loss=0.1)
    outcome = json.loads((session.session_dir / "outcome.json").read_text())
    assert outcome["outcome"] == "done" and outcome["step"] == 100
    assert not (session.session_dir / "outcome.tmp").exists()


def test_session_singleton(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_session", None)
    monkeypatch.setenv(runtime.ENV_SESSION_DIR, str(tmp_path / "single"))
    monkeypatch.setattr(Session, "_install_sigterm", lambda self: None)
    first = runtime.session()
    assert runtime.session() is first
    assert first.session_dir == tmp_path / "single"


def test_runtime_import_is_light():
    code = (
        "import sys, gpupool.runtime\n"
        "heavy = [m for m in ('torch', 'pydantic', 'sqlalchemy', 'fsspec', 'yaml', 'numpy', "
        "'click', 'rich') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
