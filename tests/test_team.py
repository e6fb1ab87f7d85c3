"""A team's pool: three `gpupool daemon` processes share one PostgreSQL database and one S3
bucket (moto's server) and split the work; daemons are SIGKILLed at random (often in the middle
of a step, holding claims or the placement lease) and started again. Every experiment finishes,
no session is started twice, no GPU second is charged twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from gpupool import db
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from tests.fakes import register_entry_point
from tests.services import PostgresServer, S3Server

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = 20
DAEMONS = 3
KILLS = 6  # SIGKILLs spread over the run, one each time a few more sessions have started
SESSION_SECONDS = 0.6  # real seconds per fake session; each experiment runs two (a hop)
TIMEOUT = 240.0  # a bound against hanging only: the loop waits on progress, not on time


class Daemons:
    """Three daemon processes; ``kill_one`` SIGKILLs a random one and starts a new one."""

    def __init__(self, command: list[str], env: dict[str, str], logs: Path, seed: int):
        self.command, self.env, self.logs = command, env, logs
        self.random = random.Random(seed)
        self.started = 0
        self.running = [self._start() for _ in range(DAEMONS)]

    def _start(self) -> subprocess.Popen:
        self.started += 1
        log = open(self.logs / f"daemon-{self.started}.log", "wb")  # noqa: SIM115 - closed by stop
        return subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill_one(self) -> None:
        victim = self.running.pop(self.random.randrange(len(self.running)))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.running.append(self._start())

    def check_alive(self) -> None:
        for daemon in self.running:
            assert daemon.poll() is None, f"a daemon exited by itself: {self.output()}"

    def stop(self) -> None:
        for daemon in self.running:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.logs.iterdir()))


def journal(folder: Path) -> list[list[str]]:
    path = folder / "journal.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def team(tmp_path: Path, postgres: PostgresServer, s3: S3Server, monkeypatch: pytest.MonkeyPatch):
    """A team's pool: a fresh PostgreSQL database, checkpoints in a bucket on the S3 server
    (reached, as a team would, through the standard AWS_* variables), and the journal provider
    registered."""
    for name, value in s3.environment.items():
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3.bucket()}/checkpoints"
    site = register_entry_point(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    folder = tmp_path / "journal"
    folder.mkdir()
    providers = {"journal": {"folder": str(folder), "seconds": SESSION_SECONDS}}
    with postgres.database() as url:
        config = tmp_path / "pool.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / "data"), "database_url": url, "poll_interval": 0.2,
            "store_url": bucket, "providers": providers}))
        pool = Pool(PoolSettings(data_dir=tmp_path / "data", database_url=url, store_url=bucket,
                                 providers=providers))
        yield pool, config, folder, site
        pool.close()


def test_three_daemons_killed_at_random_finish_everything_once(team, tmp_path: Path) -> None:
    pool, config, folder, site = team
    (tmp_path / "code").mkdir()
    spec = ExperimentSpec.model_validate({
        "name": "team", "run": "python train.py", "workdir": tmp_path / "code",
        "providers": ["journal"], "checkpoint": {"interval": 600}})
    idents = [pool.submit(spec).id for _ in range(EXPERIMENTS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("GPUPOOL_DATABASE_URL", None)
    command = [sys.executable, "-m", "gpupool", "--config", str(config), "daemon"]
    (tmp_path / "logs").mkdir()
    daemons = Daemons(command, env, tmp_path / "logs", seed=15)
    kills, next_kill_at = 0, 2
    deadline = time.monotonic() + TIMEOUT
    try:
        while not all(pool.state.experiment(i).state.terminal for i in idents):
            assert time.monotonic() < deadline, f"not finished: {daemons.output()}"
            daemons.check_alive()
            started = sum(1 for line in journal(folder) if line[0] == "started")
            if kills < KILLS and started >= next_kill_at:  # progress since the last kill
                daemons.kill_one()
                kills, next_kill_at = kills + 1, started + 1 + EXPERIMENTS * 2 // (KILLS + 1)
            time.sleep(0.05)
    finally:
        daemons.stop()
    assert kills == KILLS, f"only {kills} kills: the run ended before they were spread over it"
    collectors = {line[2] for line in journal(folder) if line[0] == "collected"}
    assert len(collectors) >= 2, "the daemons did not share the work"
    check_every_experiment_done_once(pool, idents, folder)


def check_every_experiment_done_once(pool: Pool, idents: list[str], folder: Path) -> None:
    attempts = [a for i in idents for a in pool.state.attempts(i)]
    for ident in idents:
        experiment = pool.state.experiment(ident)
        assert experiment.state == ExperimentState.SUCCEEDED, experiment
        mine = [a for a in attempts if a.experiment_id == ident]
        assert [a.state for a in mine] == [AttemptState.YIELDED, AttemptState.SUCCEEDED], mine
        assert mine[1].checkpoint_in == mine[0].checkpoint_out is not None  # resumed, not restarted
        assert experiment.last_step == 20
    started = [line for line in journal(folder) if line[0] == "started"]
    started_ids = [line[1] for line in started]
    assert len(started_ids) == len(set(started_ids)), "a session was started twice"
    assert sorted(started_ids) == sorted(a.id for a in attempts), "a session started but not tracked"
    windows: dict[str, list[tuple[float, float]]] = {}
    for _, attempt_id, start, end, _pid in started:
        windows.setdefault(attempt_id.rsplit("-a", 1)[0], []).append((float(start), float(end)))
    for ident, spans in windows.items():  # one experiment never ran in two sessions at once
        spans.sort()
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), ident
    with pool.state.engine.connect() as conn:
        ledger = conn.execute(sa.select(db.quota_ledger.c.attempt_id, db.quota_ledger.c.seconds)).all()
    charged = {row.attempt_id: row.seconds for row in ledger}
    assert len(ledger) == len(charged) == len(attempts), "an attempt charged twice or not at all"
    for attempt in attempts:
        assert charged[attempt.id] == pytest.approx(attempt.gpu_seconds)
    total = sum(pool.state.experiment(i).gpu_seconds for i in idents)
    assert sum(charged.values()) == pytest.approx(total)
