"""An experiment's life from the CLI: cancel keeps the last checkpoint, resume continues it,
checkpoints lists them, metrics shows what the script reported; progress is visible while the
session runs. Virtual time and in-memory providers (never sleeps); click's runner."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpupool.cli import cli
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.provider import PollResult
from gpupool.state import Attempt
from tests.fakes import FakeProvider, Script
from tests.test_scheduler import T0, make

R, F = AttemptState.RUNNING, AttemptState.FAILED
Y, S = AttemptState.YIELDED, AttemptState.SUCCEEDED


class ReportingProvider(FakeProvider):
    """A fake session that, while running, reports a step, a loss, and a checkpoint every
    100 steps, as the local provider reads them from the runtime's events."""

    rate = 10.0  # steps per virtual second

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        result = super().poll(attempt, now)
        if result.state != R:
            return result
        session = self.sessions[attempt.id]
        start = session.launch.restore.step if session.launch.restore else 0
        step = start + int((now - session.start) * self.rate)
        saved = (step // 100) * 100
        name = f"ckpt-{saved:012d}-0000000000000-abcdef" if saved > start else None
        return PollResult(R, step=step, heartbeat=now, started_at=session.start, total=10_000,
                          metrics={"loss": 1.0 / (1 + step)}, checkpoint=name,
                          checkpoint_at=session.start + saved / self.rate if name else None)


def invoke(pool: Pool, *args: str) -> object:
    result = CliRunner().invoke(cli, list(args), obj={"pool": pool}, catch_exceptions=False)
    return result


def test_cancel_keeps_the_running_sessions_last_checkpoint_and_resume_continues_from_it(tmp_path):
    local = FakeProvider("local", Script([(S, 10_000, 120), (S, 60, 30)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    scheduler.reconcile_once(T0 + 30)  # running; the fake session saves step 120 when collected
    cancelled = invoke(pool, "cancel", ident, "--json")
    row = json.loads(cancelled.output)
    assert row["state"] == "cancelled" and row["step"] == 120 and row["last_checkpoint"]
    experiment = pool.state.experiment(ident)
    assert experiment.last_step == 120 and experiment.last_checkpoint == row["last_checkpoint"]

    resumed = invoke(pool, "resume", ident, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["state"] == "pending"
    scheduler.reconcile_once(T0 + 60)
    second = pool.state.attempts(ident)[-1]
    assert second.checkpoint_in == experiment.last_checkpoint and second.step_start == 120
    now = T0 + 60
    while not pool.state.experiment(ident).state.terminal:
        now += 30
        scheduler.reconcile_once(now)
    assert pool.state.experiment(ident).state == ExperimentState.SUCCEEDED
    assert pool.state.experiment(ident).last_step == 150


def test_a_cancelled_sessions_time_still_counts_for_the_experiment(tmp_path):
    local = FakeProvider("local", Script([(S, 10_000, 40)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    scheduler.reconcile_once(T0 + 30)
    scheduler.cancel(ident, T0 + 130)
    experiment = pool.state.experiment(ident)
    spent = pool.state.attempts(ident)[0].gpu_seconds
    assert spent > 0 and experiment.gpu_seconds == pytest.approx(spent)
    assert experiment.last_step == 40


def test_plain_cancel_says_what_was_kept_and_how_to_resume(tmp_path):
    local = FakeProvider("local", Script([(S, 10_000, 40)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    out = invoke(pool, "cancel", ident).output
    assert "kept: step 40" in out and f"gpupool resume {ident}" in out


def test_resume_of_a_failed_experiment_resets_its_error_count(tmp_path):
    local = FakeProvider("local", Script([(F, 10, 20), (F, 10, 0), (S, 10, 5)]))
    pool, scheduler, ident = make(tmp_path, local, limits={"retries_on_error": 1})
    now = T0
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 30
    assert pool.state.experiment(ident).state == ExperimentState.FAILED
    assert invoke(pool, "resume", ident, "--detach").exit_code == 0
    experiment = pool.state.experiment(ident)
    assert experiment.state == ExperimentState.PENDING and experiment.failed_attempts == 0
    assert experiment.last_step == 20 and "resumed from step 20" in (experiment.message or "")
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 30
    assert pool.state.experiment(ident).state == ExperimentState.SUCCEEDED


@pytest.mark.parametrize("state", ["running", "succeeded"])
def test_resume_refuses_what_is_not_stopped_with_the_reason(tmp_path, state):
    local = FakeProvider("local", Script([(S, 60, 10)]))
    pool, scheduler, ident = make(tmp_path, local)
    scheduler.reconcile_once(T0)
    if state == "succeeded":
        scheduler.reconcile_once(T0 + 120)
    result = CliRunner().invoke(cli, ["resume", ident], obj={"pool": pool})
    assert result.exit_code != 0
    assert f"is {state}" in str(result.exception)


def test_resume_with_an_edited_file_replaces_the_spec_and_refuses_another_experiment(tmp_path):
    local = FakeProvider("local", Script([(AttemptState.LOST, 60, 10)] * 3))
    pool, scheduler, ident = make(tmp_path, local, limits={"max_hops": 1})
    now = T0
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 30
    assert "max_hops" in (pool.state.experiment(ident).message or "")
    refused = CliRunner().invoke(cli, ["resume", ident], obj={"pool": pool})
    assert refused.exit_code != 0 and "raise it in the experiment file" in str(refused.exception)
    edited = tmp_path / "edited.yaml"
    edited.write_text(f"name: exp\nworkdir: {tmp_path / 'code'}\nrun: python train.py\n"
                      "providers: [local]\nlimits: {max_hops: 5}\n")
    assert invoke(pool, "resume", ident, str(edited), "--detach").exit_code == 0
    assert pool.state.experiment(ident).spec["limits"]["max_hops"] == 5
    other = tmp_path / "other.yaml"
    other.write_text(edited.read_text().replace("name: exp", "name: other"))
    pool.state.move_experiment(ident, ExperimentState.CANCELLED, now)
    wrong = CliRunner().invoke(cli, ["resume", ident, str(other)], obj={"pool": pool})
    assert wrong.exit_code != 0 and "names 'other'" in str(wrong.exception)


def test_checkpoints_lists_step_time_size_place_and_which_verifies(tmp_path):
    local = FakeProvider("local", Script([(Y, 60, 10), (S, 60, 5)]))
    pool, scheduler, ident = make(tmp_path, local)
    now = T0
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 30
    rows = json.loads(invoke(pool, "checkpoints", ident, "--json").output)
    assert [r["step"] for r in rows] == [15, 10]
    assert rows[0]["latest"] and not rows[1]["latest"] and all(r["verified"] for r in rows)
    assert all(r["bytes"] > 0 and r["location"].endswith(r["name"]) for r in rows)
    # a corrupted newest checkpoint: listed as not verified; the latest is the older one
    store = pool.store_for(ident)
    victim = Path(store.root) / rows[0]["name"] / "state.bin"
    victim.write_bytes(b"torn")
    rows = json.loads(invoke(pool, "checkpoints", ident, "--json").output)
    assert not rows[0]["verified"] and "does not match" in rows[0]["problem"] and rows[1]["latest"]
    table = invoke(pool, "checkpoints", ident).output
    assert "latest" in table and "KiB" not in table and "a1 local" in table and "checkpoints of" in table


def test_status_and_live_line_show_the_running_sessions_checkpoint_loss_and_risk(tmp_path):
    pool, scheduler, ident = make(tmp_path, ReportingProvider("local", Script([(S, 10_000, 0)])))
    scheduler.reconcile_once(T0)
    scheduler.reconcile_once(T0 + 10)   # started
    scheduler.reconcile_once(T0 + 35)   # step 350: checkpoints at 100..300 saved meanwhile
    row = json.loads(invoke(pool, "status", ident, "--json").output)
    assert row["last_checkpoint"].startswith("ckpt-000000000300")
    assert row["metrics"]["loss"] == pytest.approx(1 / 351) and row["metrics"]["step"] == 350
    assert row["at_risk"]["steps"] == 50 and row["at_risk"]["since_step"] == 300
    text = invoke(pool, "status", ident).output
    assert "last checkpoint: step 300" in text and "loss" in text and "at risk: 50 steps" in text
    kinds = [e["kind"] for e in row["events"]]
    assert "checkpoint" in kinds and "metrics" not in kinds

    from gpupool.views import progress_line

    line = progress_line(pool, pool.state.experiment(ident), T0 + 35)
    wanted = ("on local", "step 350/10000", "loss 0.002849", "last checkpoint step 300", "at risk 50 steps")
    for part in wanted:
        assert part in line, line
    assert "- → -" not in text


def test_metrics_table_csv_json_and_plot_across_sessions(tmp_path):
    provider = ReportingProvider("local", Script([(Y, 40, 0), (S, 40, 0)]))
    pool, scheduler, ident = make(tmp_path, provider)
    now = T0
    while not pool.state.experiment(ident).state.terminal:
        scheduler.reconcile_once(now)
        now += 10
    rows = json.loads(invoke(pool, "metrics", ident, "--json").output)
    assert len({r["attempt"] for r in rows}) == 2 and all("loss" in r for r in rows)
    first = [r["step"] for r in rows if r["attempt"] == f"{ident}-a1"]
    assert first == sorted(first) and rows[0]["time"] <= rows[-1]["time"]
    parsed = list(csv.DictReader(io.StringIO(invoke(pool, "metrics", ident, "--csv").output)))
    assert parsed[0].keys() >= {"time", "attempt", "step", "loss"} and len(parsed) == len(rows)
    table = invoke(pool, "metrics", ident).output
    assert "loss" in table and f"{ident}-a2" in table
    plot = invoke(pool, "metrics", ident, "--plot", "loss").output
    assert "loss" in plot and "step" in plot and len(plot.splitlines()) >= 10
    missing = CliRunner().invoke(cli, ["metrics", ident, "--plot", "acc"], obj={"pool": pool})
    assert missing.exit_code != 0 and "reported: loss" in str(missing.exception)


def test_experiment_ids_complete_in_the_shell(tmp_path, monkeypatch):
    local = FakeProvider("local")
    pool, scheduler, ident = make(tmp_path, local)
    monkeypatch.setenv("GPUPOOL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COMP_WORDS", f"gpupool status {ident[:4]}")
    monkeypatch.setenv("COMP_CWORD", "2")
    monkeypatch.setenv("_GPUPOOL_COMPLETE", "bash_complete")
    result = CliRunner().invoke(cli, [], prog_name="gpupool", env={"_GPUPOOL_COMPLETE": "bash_complete"})
    assert f"plain,{ident}" in result.output


def test_status_refuses_page_zero(tmp_path):
    pool, _, _ = make(tmp_path, FakeProvider("local"))
    result = CliRunner().invoke(cli, ["status", "--page", "0"], obj={"pool": pool})
    assert result.exit_code == 2 and "--page" in result.output


def test_status_shows_whole_ids_at_80_columns_and_one_line_per_hint(tmp_path):
    pool, _, ident = make(tmp_path, FakeProvider("local"), name="twin-test-with-a-long-name")
    pool.state.update_experiment(ident, T0, wait_reason="kaggle: no credentials\n" + "how to fix\n" * 30)
    result = CliRunner().invoke(cli, ["status"], obj={"pool": pool}, env={"COLUMNS": "80"})
    assert ident in result.output
    rows = [line for line in result.output.splitlines() if "how to fix" in line]
    assert len(rows) <= 1


class LoggingProvider(ReportingProvider):
    """Each session's log grows by one line a poll."""

    def logs(self, attempt: Attempt) -> str:
        session = self.sessions[attempt.id]
        lines = int(max(0, (self.now - session.start)) // 10) + 1
        return "".join(f"{attempt.id} line {i}\n" for i in range(lines))

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        self.now = now
        return super().poll(attempt, now)


def test_logs_follow_goes_across_sessions_with_gpupools_events_between(tmp_path):
    from gpupool.logfollow import follow_logs

    provider = LoggingProvider("local", Script([(Y, 40, 0), (S, 30, 0)]))
    provider.now = T0
    pool, scheduler, ident = make(tmp_path, provider)
    scheduler.reconcile_once(T0)
    clock = iter(T0 + 10 * i for i in range(1, 100))
    out: list[str] = []
    follow_logs(pool, ident, out.append, pause=lambda: scheduler.reconcile_once(next(clock)))
    text = "".join(out)
    assert f"session 1 on local ({ident}-a1)" in text and f"session 2 on local ({ident}-a2)" in text
    assert f"{ident}-a1 line 3" in text and f"{ident}-a2 line 2" in text
    order = [text.index(s) for s in (f"{ident}-a1 line 0", "] yielded:", "] placed: attempt 2",
                                     f"{ident}-a2 line 0", "] succeeded:")]
    assert order == sorted(order), text
    assert "] checkpoint: step 100 saved on local" in text and "metrics" not in text
    assert text.count(f"{ident}-a1 line 1\n") == 1  # nothing printed twice


def test_status_explains_a_fallback_from_kaggle_to_local_for_lack_of_quota(tmp_path):
    kaggle = FakeProvider("kaggle", quota_hours=0.01)  # 36 s left: less than one slice
    local = FakeProvider("local", Script([(S, 10_000, 10)]))
    pool, scheduler, ident = make(tmp_path, kaggle, local)
    scheduler.reconcile_once(T0)
    row = json.loads(invoke(pool, "status", ident, "--json").output)
    assert row["provider"] == "local"
    assert row["fallback"].startswith("on local because kaggle") and "quota" in row["fallback"]
    text = invoke(pool, "status", ident).output
    assert "fallback: on local because kaggle" in text
    listing = CliRunner().invoke(cli, ["status"], obj={"pool": pool}, env={"COLUMNS": "200"}).output
    assert "on local because kaggle" in listing


def test_no_fallback_is_claimed_on_the_first_choice(tmp_path):
    pool, scheduler, ident = make(tmp_path, FakeProvider("kaggle"), FakeProvider("local"))
    scheduler.reconcile_once(T0)
    assert json.loads(invoke(pool, "status", ident, "--json").output)["fallback"] is None


def test_watch_json_prints_one_object_per_change_then_the_final_state(tmp_path):
    """Real clock (sessions of a fraction of a second), so `watch` runs as it does for a person."""
    import time as real_time

    from gpupool.settings import PoolSettings
    from gpupool.spec import ExperimentSpec

    local = FakeProvider("local", Script([(Y, 0.3, 10), (S, 0.3, 5)]))
    pool = Pool(PoolSettings(data_dir=tmp_path / "data", poll_interval=0.2), clock=real_time.time,
                providers={"local": local})
    (tmp_path / "code").mkdir()
    ident = pool.submit(ExperimentSpec.model_validate(
        {"name": "exp", "run": "python train.py", "workdir": tmp_path / "code", "providers": ["local"],
         "checkpoint": {"interval": 600}})).id
    result = CliRunner().invoke(cli, ["watch", ident, "--json"], obj={"pool": pool})
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().split("\n") if line.startswith("{")]
    states = [r["state"] for r in rows]
    assert states[-1] == "succeeded" and len(rows) >= 2 and rows[-1]["step"] == 15
