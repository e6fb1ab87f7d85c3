"""Notifications through apprise to a loopback HTTP receiver: the "open this notebook" message
with the Colab link (the real Colab provider against the Drive emulator), and the finished and
failed messages, driven by the scheduler's events in the state database."""

from __future__ import annotations

import json
import logging
import threading
import time
import webbrowser
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpupool.driver import Driver
from gpupool.lifecycle import AttemptState
from gpupool.notify import Message, Notifier
from gpupool.pool import Pool
from gpupool.provider import Launch, Submission
from gpupool.provider_config import Capabilities
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401
from tests.fakes import FakeProvider, Script
from tests.providers.colab_support import make_provider, mlp_spec


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.arrived:
                    receiver.bodies.append(json.loads(body))
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60.0) -> list[dict]:
        """Wait (on arrivals, not on a guessed delay) until ``count`` messages came."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.bodies) >= count, timeout), self.bodies
            return list(self.bodies)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiving = Receiver()
    yield receiving
    receiving.server.shutdown()
    receiving.server.server_close()


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("a browser was opened"))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def pool_with(tmp_path: Path, notify: list[str], clock=time.time, **providers) -> Pool:
    settings = PoolSettings(data_dir=tmp_path / "pool", notify=notify)
    return Pool(settings, clock=clock, providers=providers)


def fake_spec(name: str = "notified") -> ExperimentSpec:
    return ExperimentSpec(name=name, workdir=Path(__file__).parent, run="python train.py",
                          providers=["local"], limits={"retries_on_error": 0, "max_hops": 2})


def test_colab_waiting_for_its_person_sends_the_notebook_link(drive_emulator, tmp_path, receiver):
    colab = make_provider(drive_emulator, tmp_path)
    pool = pool_with(tmp_path, [receiver.url], colab=colab)
    experiment = pool.submit(mlp_spec(["colab"]))
    driver = Driver(pool)
    driver.step()
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.SUBMITTED and attempt.url
    [body] = receiver.wait_for(1)
    assert body["title"] == "gpupool: open this notebook for mlp-colab"
    assert attempt.url in body["message"] and "Run all" in body["message"]
    driver.step()  # nothing new: nothing sent again
    driver.release()
    assert len(receiver.bodies) == 1
    pool.close()


def test_finished_and_failed_experiments_are_notified(tmp_path, receiver):
    clock = Clock()
    local = FakeProvider("local", Script([(AttemptState.SUCCEEDED, 60.0, 10),
                                          (AttemptState.FAILED, 60.0, 0)]))
    pool = pool_with(tmp_path, [receiver.url], clock=clock, local=local)
    finished = pool.submit(fake_spec("will-finish"))
    failed = pool.submit(fake_spec("will-fail"))
    driver = Driver(pool)
    driver.step()
    clock.now += 120
    driver.step()
    driver.release()
    bodies = receiver.wait_for(2)
    titles = sorted(body["title"] for body in bodies)
    assert titles == ["gpupool: will-fail failed", "gpupool: will-finish finished"]
    by_title = {body["title"]: body["message"] for body in bodies}
    assert finished.id in by_title["gpupool: will-finish finished"]
    assert failed.id in by_title["gpupool: will-fail failed"]
    assert "fake failed" in by_title["gpupool: will-fail failed"]  # the reason it ended
    pool.close()


def test_a_restarted_scheduler_neither_repeats_nor_skips_messages(tmp_path):
    clock = Clock()
    sent: list[Message] = []
    pool = pool_with(tmp_path, [], clock=clock, local=FakeProvider("local"))
    pool.submit(fake_spec())
    first = Driver(pool, notifier=Notifier(pool, lambda m: sent.append(m) or True))
    first.step()
    first.release()
    clock.now += 120
    # the experiment finishes while a second scheduler (a restart) runs
    second = Driver(pool, notifier=Notifier(pool, lambda m: sent.append(m) or True))
    second.step()
    second.step()
    second.release()
    assert [m.title for m in sent] == ["gpupool: notified finished"]
    third = Notifier(pool, lambda m: sent.append(m) or True)
    assert third.check(clock.now) == [] and len(sent) == 1
    pool.close()


def test_old_events_are_history_not_news(tmp_path):
    clock = Clock()
    pool = pool_with(tmp_path, [], clock=clock, local=FakeProvider("local"))
    sent: list[Message] = []
    notifier = Notifier(pool, lambda m: sent.append(m) or True, max_age=3600)
    pool.submit(fake_spec())
    driver = Driver(pool, notifier=Notifier(pool, lambda m: True))
    driver.step()
    clock.now += 120
    driver.step()  # finished, but this driver's notifier is another one
    driver.release()
    assert notifier.check(clock.now + 7200) == [] and sent == []
    pool.close()


def test_an_unreachable_notification_service_never_stops_the_scheduler(tmp_path, caplog):
    clock = Clock()
    secret_url = "json://127.0.0.1:9/hook?token=very-secret-value"  # port 9: nothing listens
    pool = pool_with(tmp_path, [secret_url], clock=clock, local=FakeProvider("local"))
    experiment = pool.submit(fake_spec())
    driver = Driver(pool)
    caplog.set_level(logging.WARNING)
    driver.step()
    clock.now += 120
    report = driver.step()
    driver.release()
    assert report is not None and pool.state.experiment(experiment.id).state.value == "succeeded"
    assert "was not delivered" in caplog.text
    assert "very-secret-value" not in caplog.text
    pool.close()


def test_schedulers_started_one_step_at_a_time_send_what_happened_in_between(tmp_path):
    """`gpupool daemon --once` from cron: each run is a new notifier; none may lose the events
    written while no scheduler ran (here: an experiment that ended between two runs)."""
    clock = Clock()
    sent: list[Message] = []
    pool = pool_with(tmp_path, [], clock=clock, local=FakeProvider("local"))
    cron = Driver(pool, notifier=Notifier(pool, lambda m: sent.append(m) or True))
    cron.release()  # the first run found nothing to do
    experiment = pool.submit(fake_spec())
    Scheduler(pool).reconcile_once(clock.now)  # `run --detach` places it, without notifying
    clock.now += 120
    pool.state.add_event(clock.now, experiment.id, None, "failed", "an event written meanwhile")
    later = Driver(pool, notifier=Notifier(pool, lambda m: sent.append(m) or True))
    later.step()
    later.release()
    assert "gpupool: notified failed" in [m.title for m in sent]
    pool.close()


class OpenedByHand(FakeProvider):
    """A third party's adapter whose sessions a person starts: it says so as data."""

    capabilities = Capabilities(needs_person="a person starts each session on the web page")

    def submit(self, launch: Launch) -> Submission:
        return replace(super().submit(launch), url=f"https://example.test/{launch.attempt_id}")


def test_any_adapter_that_declares_it_needs_a_person_gets_its_link_sent(tmp_path, receiver):
    clock = Clock()
    studio = OpenedByHand("local", Script([(AttemptState.SUCCEEDED, 600.0, 10)]))
    pool = pool_with(tmp_path, [receiver.url], clock=clock, local=studio)
    spec = fake_spec("by-hand").model_copy(update={"providers": ["local"]})
    experiment = pool.submit(spec)
    driver = Driver(pool)
    driver.step()
    driver.release()
    [body] = receiver.wait_for(1)
    assert body["title"] == "gpupool: open this notebook for by-hand"
    assert f"https://example.test/{experiment.id}-a1" in body["message"]
    pool.close()
