"""Crash consistency beyond the database writes of ``test_scheduler``: the scheduler killed inside
a relay (a store copy cut after N bytes, a manifest half written) and right after each provider
call (the remote side did it, the database does not know yet); corrupt checkpoints; two
schedulers on one SQLite database."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner

import gpupool.store as store_module
from gpupool import db
from gpupool.cli import cli
from gpupool.driver import Driver
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.manifest import Manifest, publish_local
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.state import Attempt
from gpupool.store import CheckpointStore
from tests.fakes import FakeProvider, Script
from tests.services import Databases

# Every test runs on each state backend (tests/conftest.py: SQLite, PostgreSQL).
pytestmark = pytest.mark.usefixtures("pool_database")

T0 = 1_800_000_000.0
Y, L, S = AttemptState.YIELDED, AttemptState.LOST, AttemptState.SUCCEEDED
ROOT = Path(__file__).resolve().parent.parent
DB_WRITE_CRASH_POINTS = 31  # tests/test_scheduler.py: a crash at every database write
MIN_CRASH_POINTS = 55  # tried here, on top of those
CUTS = (0, 1, 4096, 32 * 1024, 64 * 1024 - 1, 64 * 1024)  # bytes of a 64 KiB file copied


class Crash(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in gpupool catches it."""


class BigCheckpoints(FakeProvider):
    """Sessions leave two-file checkpoints of some size, so a copy can be cut midway."""

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        existing = [m for m in store.list() if m.attempt == attempt.id]
        session = self.sessions[attempt.id]
        if existing or session.steps == 0:
            return existing
        step = (session.launch.restore.step if session.launch.restore else 0) + session.steps
        staging = Path(tempfile.mkdtemp())
        (staging / "state.bin").write_bytes(os.urandom(64 * 1024))
        (staging / "rng").mkdir()
        (staging / "rng" / "seed.bin").write_bytes(f"{attempt.id}:{step}".encode())
        root = Path(tempfile.mkdtemp())
        manifest = publish_local(staging, root, step=step, experiment=attempt.experiment_id,
                                 attempt=attempt.id, provider=self.name, metadata={"save_seconds": 2.0})
        return [store.import_local(root / manifest.name, manifest)]


def make(tmp: Path, provider: FakeProvider, **spec: object) -> tuple[Pool, str]:
    pool = Pool(PoolSettings(data_dir=tmp / "data"), clock=lambda: T0, providers={provider.name: provider})
    (tmp / "code").mkdir(parents=True, exist_ok=True)
    fields = {"name": "exp", "run": "python train.py", "workdir": tmp / "code",
              "providers": [provider.name], "checkpoint": {"interval": 600, "keep_last": 2}}
    fields.update(spec)
    return pool, pool.submit(ExperimentSpec.model_validate(fields)).id


def three_sessions() -> Script:
    return Script([(Y, 300, 100), (L, 200, 50), (S, 100, 30)])


# -- crash points ---------------------------------------------------------------------------

class CrashPlan:
    """Raises ``Crash`` at one chosen point: inside the n-th store copy after ``cut`` bytes, in
    the n-th manifest write after half of it, in the n-th pruning delete once the manifest is
    gone, or right after the n-th provider call returns."""

    def __init__(self, kind: str, nth: int, cut: int | None = None):
        self.kind, self.nth, self.cut = kind, nth, cut
        self.seen = {"stream": 0, "manifest": 0, "delete": 0, "provider": 0}
        self.fired = False

    def hit(self, kind: str) -> bool:
        self.seen[kind] += 1
        fire = not self.fired and kind == self.kind and self.seen[kind] == self.nth
        self.fired = self.fired or fire
        return fire

    def install(self, monkeypatch: pytest.MonkeyPatch, provider: FakeProvider) -> None:
        real_stream, real_manifest = store_module._stream, CheckpointStore._write_manifest
        real_delete = CheckpointStore.delete

        def stream(src_fs, src, dst_fs, dst):  # type: ignore[no-untyped-def]
            if not self.hit("stream"):
                return real_stream(src_fs, src, dst_fs, dst)
            with src_fs.open(src, "rb") as reader, dst_fs.open(dst, "wb") as writer:
                data = reader.read()
                writer.write(data[: min(self.cut or 0, len(data))])
            raise Crash()

        def write_manifest(store: CheckpointStore, manifest: Manifest) -> None:
            if not self.hit("manifest"):
                return real_manifest(store, manifest)
            text = manifest.to_json().encode()
            with store.fs.open(store._path(manifest.name, "manifest.json"), "wb") as handle:
                handle.write(text[: len(text) // 2])
            raise Crash()

        def delete(store: CheckpointStore, name: str) -> None:
            if not self.hit("delete"):
                return real_delete(store, name)
            store.fs.rm(store._path(name, "manifest.json"))
            raise Crash()

        monkeypatch.setattr(CheckpointStore, "delete", delete)
        monkeypatch.setattr(store_module, "_stream", stream)
        monkeypatch.setattr(CheckpointStore, "_write_manifest", write_manifest)
        for name in ("submit", "poll", "collect", "cancel"):
            real = getattr(provider, name)

            def after(*args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
                result = _real(*args, **kwargs)
                if self.hit("provider"):
                    raise Crash()
                return result

            setattr(provider, name, after)


def run_with_crash(tmp: Path, plan: CrashPlan, monkeypatch: pytest.MonkeyPatch, database: str) -> dict:
    provider = BigCheckpoints("kaggle", three_sessions())
    monkeypatch.setenv("GPUPOOL_DATABASE_URL", database)  # each run on a fresh database
    pool, ident = make(tmp, provider)
    store = pool.store_for(ident)
    with monkeypatch.context() as patch:
        plan.install(patch, provider)
        scheduler, now = Scheduler(pool), T0
        for _ in range(200):
            before = store.latest()
            try:
                scheduler.reconcile_once(now)
            except Crash:
                if plan.kind in ("stream", "manifest"):  # cut inside a relay: nothing new visible
                    assert store.latest() == before, f"{plan.kind} {plan.nth}: torn checkpoint exposed"
                scheduler = Scheduler(pool)  # restarted over the same database and store
            if pool.state.experiment(ident).state.terminal:
                break
            now += 60
    check_finished_exactly_once(pool, ident, provider, f"{plan.kind} #{plan.nth} cut={plan.cut}")
    return plan.seen


def check_finished_exactly_once(pool: Pool, ident: str, provider: FakeProvider, where: str) -> None:
    experiment = pool.state.experiment(ident)
    attempts = pool.state.attempts(ident)
    assert experiment.state == ExperimentState.SUCCEEDED, where
    assert sorted(a.id for a in attempts) == sorted(provider.sessions), f"{where}: duplicated/lost"
    assert len(provider.sessions) == 3, f"{where}: a session was started twice or lost"
    assert pool.state.charged_seconds(provider.name, "default", 0) == pytest.approx(
        sum(a.gpu_seconds for a in attempts)), f"{where}: quota charged twice"
    assert experiment.last_step == 180, where
    store = pool.store_for(ident)
    for manifest in store.list():  # every visible checkpoint is complete
        store.verify(manifest)


def test_crash_inside_relays_and_after_each_provider_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          databases: Databases) -> None:
    """Kill the scheduler in every store copy (after 0, 1, ..., all bytes), every manifest
    write, every pruning delete, and right after every provider call of a three-session run;
    restart it each time; the experiment finishes with nothing lost, doubled or charged twice."""
    counts = run_with_crash(tmp_path / "dry", CrashPlan("none", 0), monkeypatch, databases.new())
    plans = [CrashPlan("stream", n, cut) for n in range(1, counts["stream"] + 1)
             for cut in CUTS]
    plans += [CrashPlan("manifest", n) for n in range(1, counts["manifest"] + 1)]
    plans += [CrashPlan("delete", n) for n in range(1, counts["delete"] + 1)]
    plans += [CrashPlan("provider", n) for n in range(1, counts["provider"] + 1)]
    for i, plan in enumerate(plans):
        run_with_crash(tmp_path / str(i), plan, monkeypatch, databases.new())
        assert plan.fired, f"crash point {plan.kind} #{plan.nth} never reached"
    tried = len(plans)
    print(f"\ncrash points tried: {tried} here ({counts['stream']} copies x {len(CUTS)} cuts, "
          f"{counts['manifest']} manifest writes, {counts['delete']} pruning deletes, "
          f"{counts['provider']} provider calls) "
          f"+ {DB_WRITE_CRASH_POINTS} database writes in test_scheduler = "
          f"{tried + DB_WRITE_CRASH_POINTS}")
    assert tried >= MIN_CRASH_POINTS


# -- corrupt checkpoints --------------------------------------------------------------------

def test_flipped_bytes_are_detected_and_the_previous_checkpoint_used(tmp_path: Path) -> None:
    provider = BigCheckpoints("kaggle", Script([(Y, 300, 100), (Y, 300, 50), (S, 100, 30)]))
    pool, ident = make(tmp_path, provider)
    store = pool.store_for(ident)
    collect = provider.collect

    def collect_then_flip(attempt: Attempt, target: CheckpointStore) -> list[Manifest]:
        published = collect(attempt, target)
        if attempt.seq == 2 and published:  # bit rot in the store after the relay verified it
            path = Path(store.root) / published[0].name / "state.bin"
            data = bytearray(path.read_bytes())
            data[100] ^= 0xFF
            path.write_bytes(bytes(data))
        return published

    provider.collect = collect_then_flip  # type: ignore[method-assign]
    scheduler, now = Scheduler(pool), T0
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 60
    first, second, third = pool.state.attempts(ident)
    assert third.checkpoint_in == first.checkpoint_out and third.step_start == 100
    # the second session's checkpoint verified as it entered the store (so it is recorded as
    # its output); the rot after that is caught by the hash before the next session's submit
    assert second.checkpoint_out is not None and second.checkpoint_out != third.checkpoint_in
    events = [e for e in pool.state.events(ident, limit=100) if e["kind"] == "corrupt-checkpoint"]
    assert events and "does not match" in events[0]["message"]
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    shown = CliRunner().invoke(cli, ["--config", str(config), "status", ident])
    assert shown.exit_code == 0, shown.output
    assert "corrupt-checkpoint" in shown.output and "skipped" in shown.output


# -- two schedulers, one database -----------------------------------------------------------

def test_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path: Path) -> None:
    provider = FakeProvider("kaggle")
    pool, ident = make(tmp_path, provider)
    other = Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0 + 5,
                 providers={"kaggle": provider})
    first, second = Driver(pool, owner="host-a:1:aa"), Driver(other, owner="host-b:2:bb")
    assert first.step() is not None and first.holds_lease
    assert second.step() is None and not second.holds_lease
    assert len(pool.state.attempts(ident)) == 1
    first.release()
    assert second.step() is not None  # released: the other takes over, places nothing twice
    assert len(pool.state.attempts(ident)) == 1 and provider.submits == 1


class CountingNotifier:
    def __init__(self) -> None:
        self.checks = 0

    def check(self, now: float) -> None:
        self.checks += 1


def test_schedulers_split_the_work_and_only_the_lease_holder_notifies(tmp_path: Path) -> None:
    provider = FakeProvider("kaggle", Script([(S, 3600, 10)] * 4))
    pool, ident = make(tmp_path, provider)
    spec = ExperimentSpec.model_validate(pool.state.experiment(ident).spec)
    idents = [ident] + [pool.submit(spec).id for _ in range(3)]
    other = Pool(PoolSettings(data_dir=tmp_path / "data"), clock=lambda: T0 + 5,
                 providers={"kaggle": provider})
    notices = CountingNotifier(), CountingNotifier()
    first = Driver(pool, owner="host-a:1:aa", notifier=notices[0])  # type: ignore[arg-type]
    second = Driver(other, owner="host-b:2:bb", notifier=notices[1])  # type: ignore[arg-type]
    assert first.step() is not None and len(provider.sessions) == 4  # placed all four
    assert second.step() is None  # the first's claims are live; it lets go of half next step
    first.step()
    report = second.step()
    assert report is not None and not second.holds_lease
    with pool.state.engine.connect() as conn:
        owners = conn.execute(sa.select(db.experiments.c.claimed_by)).scalars().all()
    assert sorted(owners) == ["host-a:1:aa"] * 2 + ["host-b:2:bb"] * 2  # each experiment: one
    assert provider.submits == 4  # nothing placed twice
    assert notices[0].checks == 2 and notices[1].checks == 0  # one sender of notifications
    assert all(len(pool.state.attempts(i)) == 1 for i in idents)


def test_two_daemon_processes_started_together_never_double_place(tmp_path: Path) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "poll_interval": 1,
                                      "providers": {"local": {"max_concurrent": 4, "gpus": "none"}}}))
    (tmp_path / "code").mkdir()
    pool = Pool(PoolSettings(data_dir=tmp_path / "data", providers={"local": {"max_concurrent": 4,
                                                                               "gpus": "none"}}))
    spec = ExperimentSpec.model_validate({"name": "both", "run": "sleep 20", "workdir": tmp_path / "code",
                                          "providers": ["local"], "resources": {"gpu": "none"}})
    idents = [pool.submit(spec).id for _ in range(3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gpupool", "--config", str(config), "daemon", "--once"]
    try:
        daemons = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for _ in range(2)]
        outputs = [d.communicate(timeout=60)[0] for d in daemons]
        attempts = [a for ident in idents for a in pool.state.attempts(ident)]
        placed = sum(out.count("placed ") for out in outputs)
        assert placed == 3 and len(attempts) == 3, outputs
        assert all(len(pool.state.attempts(i)) == 1 for i in idents)
        # the other was refused the lease, or got it afterwards and found nothing to place
        assert sum(1 for out in outputs if "placed " in out) == 1, outputs
    finally:
        scheduler = Scheduler(pool)
        for ident in idents:
            scheduler.cancel(ident, time.time())
