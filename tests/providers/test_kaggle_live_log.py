"""A running Kaggle session's log, followed live through GetKernelSessionLogsStream.

Kaggle lists a session's log with its outputs only once the session is over; while it runs the
log comes as Server-Sent Events. The emulator is set to behave that way here
(``log_in_output_list_while_running=False``), runs a real kernel that prints lines and then
waits on a gate file, and the tests read its log, through the real kagglesdk client, before
the gate opens and after the session ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.lifecycle import AttemptState
from gpupool.scheduler import Scheduler
from gpupool.state import Attempt
from gpupool_providers.kaggle import KaggleProvider
from gpupool_providers.kaggle.outputs import log_lines
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.providers.test_kaggle import (  # noqa: F401 - fixtures used by name
    drive,
    emu_fixture,
    fast_section,
    isolated_env,
    make_pool,
    spec,
)

LIVE_SCRIPT = '''\
"""Prints three lines and a progress report, then waits for the test to open the gate."""
import os, time
from gpupool import runtime
session = runtime.session()
for i in range(3):
    print(f"live line {i}", flush=True)
session.report(7, total=10, loss=0.5)
give_up = time.monotonic() + 120  # never outlive a failed test
while not os.path.exists(os.environ["GATE"]) and time.monotonic() < give_up:
    time.sleep(0.05)
print("after the gate", flush=True)
'''
FIRST_LINES = "live line 0\nlive line 1\nlive line 2\n"
SECTION = {"live_log_idle_seconds": 0.5, "live_log_seconds": 5.0}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait on the emulator's progress (the bound only ends a broken test)."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"never happened: {what}"
        time.sleep(0.05)


def printed(session, text: str) -> bool:  # type: ignore[no-untyped-def]
    return any(text in str(entry.get("data", "")) for entry in list(session.log))


def start_gated(emu: KaggleEmulator, tmp_path: Path, **section: object
                ) -> tuple[KaggleProvider, Attempt, Path, object, str]:
    """A kernel that printed FIRST_LINES and now waits on the returned gate file."""
    emu.config.log_in_output_list_while_running = False
    pool, provider, _ = make_pool(tmp_path, **{**SECTION, **section})
    gate = tmp_path / "gate"
    experiment_spec = spec(tmp_path, run="python live.py", env={"GATE": str(gate)})
    (Path(experiment_spec.workdir) / "live.py").write_text(LIVE_SCRIPT)
    experiment = pool.submit(experiment_spec)
    Scheduler(pool).reconcile_once(time.time())
    [attempt] = pool.state.attempts(experiment.id)
    wait_for(lambda: len(emu.sessions) == 1, "the kernel was pushed")
    [session] = emu.sessions.values()
    wait_for(lambda: printed(session, '"step": 7'), "the kernel printed its lines")
    return provider, attempt, gate, session, experiment.id


def pool_file(tmp_path: Path) -> Path:
    """The pool file of make_pool's pool, for the CLI."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                    "providers": {"kaggle": fast_section(**SECTION)}}))
    return path


def cli_logs(config: Path, experiment_id: str) -> str:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["--config", str(config), "logs",
                                                            experiment_id])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_running_kernels_lines_show_before_it_ends_and_after(emu: KaggleEmulator,
                                                             tmp_path: Path) -> None:
    provider, attempt, gate, session, experiment_id = start_gated(emu, tmp_path)
    # What the old code read: the output listing has no log while the session runs.
    _, listed = provider.remote.outputs(session.owner, session.slug, session.version)
    assert log_lines(listed) == []

    live = provider.logs(attempt)
    assert FIRST_LINES in live and live.endswith("\n")
    assert "after the gate" not in live
    assert FIRST_LINES in cli_logs(pool_file(tmp_path), experiment_id)
    assert session.live, "the kernel ended before its live log was read"
    assert any(r.endpoint == "GetKernelSessionLogsStream" for r in emu.requests)

    gate.touch()
    pool, _, _ = make_pool(tmp_path, **SECTION)
    drive(pool, experiment_id, timeout=60)
    ended = pool.state.attempts(experiment_id)[0]
    assert ended.state.terminal
    saved = pool.provider("kaggle").logs(ended)
    assert saved.startswith(live)  # what -f already showed stays a prefix of the whole log
    assert "after the gate" in saved
    assert "after the gate" in cli_logs(pool_file(tmp_path), experiment_id)


def test_poll_reports_the_live_step(emu: KaggleEmulator, tmp_path: Path) -> None:
    provider, attempt, gate, session, _ = start_gated(emu, tmp_path)
    result = provider.poll(attempt, time.time())
    assert result.state == AttemptState.RUNNING
    assert result.step == 7 and result.total == 10
    assert session.live
    gate.touch()


@pytest.mark.parametrize("fault", [Fault.http(500), Fault.hang(30), Fault.reset()],
                         ids=["500", "hang", "reset"])
def test_a_failed_live_read_falls_back_to_what_is_known(emu: KaggleEmulator, tmp_path: Path,
                                                        fault: Fault) -> None:
    provider, attempt, gate, session, _ = start_gated(emu, tmp_path)
    emu.config.log_in_output_list_while_running = True  # the listing knows the lines so far
    emu.inject("GetKernelSessionLogsStream", fault)
    started = time.monotonic()
    text = provider.logs(attempt)
    assert FIRST_LINES in text
    assert time.monotonic() - started < 25, "a hanging stream was not cut by its idle timeout"
    assert session.live
    gate.touch()


def test_no_live_log_and_no_listing_gives_empty_not_a_traceback(emu: KaggleEmulator,
                                                                tmp_path: Path) -> None:
    provider, attempt, gate, _, _ = start_gated(emu, tmp_path, max_retries=0)
    emu.inject("GetKernelSessionLogsStream", Fault.http(503))
    emu.inject("ListKernelSessionOutput", Fault.http(503))
    assert provider.logs(attempt) == ""
    gate.touch()



def test_a_live_read_stops_at_its_budget(emu: KaggleEmulator, tmp_path: Path) -> None:
    """A stream that keeps talking is cut at ``live_log_seconds`` (the clock is injected)."""
    from gpupool_providers.kaggle.livelog import read_live_log

    provider, attempt, gate, _, _ = start_gated(emu, tmp_path)
    times = iter([0.0, 100.0])  # the deadline is set at 0; the first line comes at 100 s
    lines = read_live_log(provider.remote, provider._record_of(attempt), idle_seconds=5.0,
                          budget_seconds=5.0, clock=lambda: next(times, 100.0))
    assert lines == ["[gpupool] run: python live.py"]
    gate.touch()


def test_follow_shows_live_lines_before_the_end_and_each_line_once(emu: KaggleEmulator,
                                                                   tmp_path: Path) -> None:
    from gpupool.logfollow import follow_logs

    _, _, gate, session, experiment_id = start_gated(emu, tmp_path)
    pool, _, _ = make_pool(tmp_path, **SECTION)
    scheduler = Scheduler(pool)
    shown: list[str] = []
    seen_live: list[bool] = []
    give_up = time.monotonic() + 60

    def pause() -> None:  # the follower's wait: check what it printed, then step the scheduler
        if not gate.exists():
            seen_live.append(session.live and FIRST_LINES in "".join(shown))
            gate.touch()
        assert time.monotonic() < give_up, "the experiment never ended"
        time.sleep(0.1)
        scheduler.reconcile_once(time.time())

    follow_logs(pool, experiment_id, shown.append, pause=pause)
    text = "".join(shown)
    assert seen_live == [True], "the running session's lines were not followed live"
    assert text.count("live line 1\n") == 1 and text.count("after the gate\n") == 1
