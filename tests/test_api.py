"""The library face (gpupool.api), used from a script with no click: submit, follow, status,
logs, cancel (including a session that cannot be stopped), quotas, the providers report,
checkpoints and pull. One ManualClock moves the scheduler, the progress loop and the log
follower, so nothing here waits; the CLI modules are checked to stand on the face alone."""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gpupool import api, cli, cli_life, cli_plan
from gpupool.clock import ManualClock
from gpupool.errors import NotFound, StateError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from tests.fakes import FakeProvider, Script

pytestmark = pytest.mark.usefixtures("pool_database")

T0 = 1_800_000_000.0
Y, S = AttemptState.YIELDED, AttemptState.SUCCEEDED


class SchedulingClock(ManualClock):
    """Virtual time in which every sleep also runs one scheduler step at the new time: what
    a daemon does meanwhile for a person following an experiment."""

    def __init__(self, start: float):
        super().__init__(start)
        self.on_sleep: Callable[[float], object] = lambda now: None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.on_sleep(self.now)


def make(tmp_path: Path, *providers: FakeProvider, clock: ManualClock) -> tuple[Pool, str]:
    pool = Pool(PoolSettings(data_dir=tmp_path / "data"), clock=clock,
                providers={p.name: p for p in providers})
    (tmp_path / "code").mkdir(exist_ok=True)
    spec = ExperimentSpec.model_validate(
        {"name": "exp", "run": "python train.py", "workdir": tmp_path / "code",
         "providers": [p.name for p in providers], "checkpoint": {"interval": 600}})
    return pool, api.submit(pool, spec).id


def test_a_script_follows_an_experiment_to_its_end_and_reads_its_results(tmp_path):
    clock = SchedulingClock(T0)
    local = FakeProvider("local", Script([(Y, 300, 100), (S, 120, 40)]))
    pool, ident = make(tmp_path, local, clock=clock)
    scheduler = Scheduler(pool)
    clock.on_sleep = scheduler.reconcile_once
    scheduler.reconcile_once(clock())

    updates = list(itertools.islice(api.progress(pool, ident, every=60), 100))

    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    assert set(clock.slept) == {60} and len(clock.slept) == len(updates) - 1  # no real wait
    assert updates[0].line.startswith(f"{ident} on local") and updates[-1].row["state"] == "succeeded"
    outcome = api.outcome(pool, ident)
    assert outcome.succeeded and outcome.attempts == 2
    status = api.experiment_status(pool, ident)
    assert [a["state"] for a in status["attempts"]] == ["yielded", "succeeded"]
    assert status["step"] == 140 and status["hops"] == 1 and status["pull"] == f"gpupool pull {ident}"
    page = api.status_page(pool)
    assert (page.total, page.unfinished, [r["id"] for r in page.rows]) == (1, 0, [ident])
    assert page.now == clock() and page.scheduler["running"] is False

    rows = api.checkpoints(pool, ident)
    assert rows[0]["step"] == 140 and rows[0]["latest"] and rows[0]["verified"]
    pulled = api.pull(pool, ident, tmp_path / "out")
    assert pulled.manifest.step == 140 and pulled.written and all(p.exists() for p in pulled.written)

    assert api.attempt_log(pool, ident) == f"log of {ident}-a2\nTraceback: boom\n"
    assert api.attempt_log(pool, ident, 1).startswith(f"log of {ident}-a1")
    with pytest.raises(StateError, match="has no attempt 9"):
        api.attempt_log(pool, ident, 9)


def test_follow_logs_waits_on_the_pool_clock(tmp_path):
    clock = SchedulingClock(T0)
    pool, ident = make(tmp_path, FakeProvider("local", Script([(Y, 60, 10), (S, 60, 5)])), clock=clock)
    scheduler = Scheduler(pool)
    clock.on_sleep = scheduler.reconcile_once
    scheduler.reconcile_once(clock())
    shown: list[str] = []

    api.follow_logs(pool, ident, shown.append, every=30)

    text = "".join(shown)
    assert f"session 1 on local ({ident}-a1)" in text and f"session 2 on local ({ident}-a2)" in text
    assert text.index(f"log of {ident}-a1") < text.index(f"log of {ident}-a2")
    assert clock.slept and set(clock.slept) == {30}


def test_cancel_returns_the_session_it_could_not_stop_and_keeps_tracking_it(tmp_path):
    clock = ManualClock(T0)
    kaggle = FakeProvider("kaggle", Script([(S, 10_000, 10)], cancel_fails=True))
    pool, ident = make(tmp_path, kaggle, clock=clock)
    Scheduler(pool).reconcile_once(clock())
    clock.advance(120)

    done = api.cancel(pool, ident)

    assert done.experiment.state is ExperimentState.CANCELLED
    assert len(done.failures) == 1 and done.failures[0].action == f"stop {ident}-a1 on the service's web page"
    assert [a.id for a in pool.state.attempts(ident, active=True)] == [f"{ident}-a1"]
    assert pool.state.events(ident)[-1]["at"] == clock()  # recorded at the pool's time


def test_quotas_and_the_providers_report_cover_every_configured_provider(tmp_path):
    clock = ManualClock(T0)
    kaggle = FakeProvider("kaggle", Script([(S, 1800, 10)]), quota_hours=30)
    local = FakeProvider("local", enabled=False)
    pool, ident = make(tmp_path, kaggle, local, clock=clock)
    scheduler = Scheduler(pool)
    scheduler.reconcile_once(clock())
    clock.advance(1800)
    scheduler.reconcile_once(clock())
    assert api.outcome(pool, ident).succeeded

    rows = {row["provider"]: row for row in api.quotas(pool)}  # colab, installed, shows too

    assert "local" not in rows  # disabled
    assert (rows["kaggle"]["total_hours"], rows["kaggle"]["source"]) == (30.0, "ledger")
    assert rows["kaggle"]["used_hours"] == pytest.approx(0.5, abs=0.01)
    assert rows["kaggle"]["remaining_hours"] == pytest.approx(29.5, abs=0.01)
    report = {row["provider"]: row for row in api.providers_report(pool)}
    assert report["kaggle"] == {"provider": "kaggle", "usable": True, "hint": "fake"}
    assert report["local"] == {"provider": "local", "usable": False,
                               "hint": "disabled in the pool configuration"}


def test_an_unknown_experiment_is_not_found_everywhere(tmp_path):
    pool, _ = make(tmp_path, FakeProvider("local"), clock=ManualClock(T0))
    calls = [api.experiment_view, api.experiment_status, api.attempt_log, api.cancel, api.metrics,
             api.checkpoints, api.pull, api.resume, api.outcome,
             lambda p, i: next(api.progress(p, i)), lambda p, i: api.follow_logs(p, i, print)]
    for call in calls:
        with pytest.raises(NotFound):
            call(pool, "no-such-experiment")


def test_the_cli_stands_on_the_face():
    """The commands parse, call gpupool.api and render: none reads the state database, builds
    a scheduler, or reads or waits on time of its own."""
    for module in (cli, cli_life, cli_plan):
        source = inspect.getsource(module)
        for reach in (r"pool\.state\b", r"\bScheduler\(", r"\btime\.time\(", r"\btime\.sleep\(",
                      r"\bState\(", r"gpupool\.state\b"):
            assert not re.search(reach, source), f"{module.__name__} uses {reach}"


def test_run_schedules_in_this_process_until_the_experiment_ends(tmp_path):
    """The real clock (sessions of a fraction of a second) and the real background driver, as
    `gpupool run` uses them; it waits on the experiment's progress, not on a guessed time."""
    local = FakeProvider("local", Script([(Y, 0.3, 10), (S, 0.3, 5)]))
    pool = Pool(PoolSettings(data_dir=tmp_path / "data", poll_interval=0.2), providers={"local": local})
    (tmp_path / "code").mkdir()
    spec = ExperimentSpec.model_validate(
        {"name": "exp", "run": "python train.py", "workdir": tmp_path / "code", "providers": ["local"],
         "checkpoint": {"interval": 600}})
    seen: list[str] = []

    outcome = api.run(pool, spec, on_progress=lambda update: seen.append(update.row["state"]))

    assert outcome.succeeded and outcome.attempts == 2 and outcome.experiment.last_step == 15
    assert seen[-1] == "succeeded" and "succeeded" not in seen[:-1]
    assert api.status_page(pool).scheduler["running"] is False  # the lease was handed back
    assert api.step_once(pool, role="daemon") is not None  # so another scheduler steps at once


def test_the_library_prints_nothing_until_the_application_sets_up_logging() -> None:
    """A warning from gpupool or an adapter reaches no stderr through Python's last-resort
    handler: a script using the library face decides where its logs go."""
    import subprocess
    import sys

    code = ("import logging, gpupool, gpupool_providers\n"
            "logging.getLogger('gpupool.quota').warning('quota API failed')\n"
            "logging.getLogger('gpupool_providers.kaggle.provider').warning('quota API failed')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
