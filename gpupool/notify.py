"""Telling the person when they are needed: a Colab notebook waits to be opened, or an
experiment finished or failed.

Messages go through apprise (desktop, ntfy, Telegram, e-mail, a webhook…), to the URLs listed
under ``notify:`` in the pool file. The scheduler that holds the lease (``gpupool daemon`` or a
foreground ``gpupool run``) reads the events it and others wrote to the state database since
the last ones it notified, so nothing in the scheduler itself knows about notifications, and a
restarted scheduler neither repeats nor skips a message (the position is kept in a small file).
Notification URLs carry secrets (tokens, passwords): they are never printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gpupool import db
from gpupool.errors import NotFound
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool

log = logging.getLogger("gpupool.notify")

MAX_AGE_SECONDS = 3600.0  # older events are history, not news: skipped after a long pause
CURSOR_FILE = "notify-cursor.json"
ENDINGS_TOLD = frozenset({ExperimentState.SUCCEEDED, ExperimentState.FAILED})  # cancelling: the user knows


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    to: tuple[str, ...] = ()  # apprise URLs of the one person it is for (an account's owner)


Send = Callable[[Message], bool]  # True when every service took it


def invalid_urls(urls: list[str]) -> list[int]:
    """Indexes of ``urls`` that apprise does not recognise (wrong scheme, missing parts)."""
    import apprise

    bad = []
    for index, url in enumerate(urls):
        if not apprise.Apprise().add(url):
            bad.append(index)
    return bad


def apprise_sender(urls: list[str]) -> Send:
    """A sender that hands each message to every apprise URL."""
    import apprise

    service = apprise.Apprise()
    for url in urls:
        service.add(url)

    def send(message: Message) -> bool:
        return bool(service.notify(title=message.title, body=message.body))

    return send


class Notifier:
    """Turns new events in the state database into messages; ``check(now)`` sends them.

    ``send`` is the seam for tests; by default apprise with the pool's ``notify`` URLs."""

    def __init__(self, pool: Pool, send: Send, *, cursor_file: Path | None = None,
                 max_age: float = MAX_AGE_SECONDS,
                 send_to: Callable[[list[str]], Send] = apprise_sender):
        self.pool = pool
        self.send = send
        self.send_to = send_to  # builds a sender for a message's own ``to`` URLs
        self.cursor_file = cursor_file or Path(pool.settings.data_dir) / CURSOR_FILE
        self.max_age = max_age
        self.cursor = self._load_cursor()

    @classmethod
    def for_pool(cls, pool: Pool) -> Notifier | None:
        """A notifier for the pool's ``notify`` URLs, or None when there are none."""
        urls = list(pool.settings.notify)
        if urls:
            return cls(pool, apprise_sender(urls))
        if _members_notified(pool):  # only members' own URLs: nothing goes to the pool's
            return cls(pool, lambda message: True)
        return None

    def check(self, now: float) -> list[Message]:
        """Send a message for each notable event since the last check; returns those sent."""
        sent = []
        for event in self._new_events():
            message = self.message_for(event) if now - event["at"] <= self.max_age else None
            if message is not None:
                if self._deliver(message):
                    sent.append(message)
                else:  # the services' own retries are spent; do not block the scheduler on them
                    log.warning("a notification (%s) was not delivered to every service",
                                message.title)
            self._save_cursor(event["id"])
        return sent

    def _deliver(self, message: Message) -> bool:
        delivered = self.send(message)
        if message.to:
            delivered = self.send_to(list(message.to))(message) and delivered
        return delivered

    def message_for(self, event: dict[str, Any]) -> Message | None:
        """The message an event deserves, or None for the many that need nobody."""
        # a state change's event is named by its target state (State._transition's callers)
        if event["attempt_id"] is None and event["kind"] in ENDINGS_TOLD:
            return self._ended(event)
        if event["attempt_id"] is not None and event["kind"] == AttemptState.SUBMITTED:
            return self._waiting(event)
        return None

    def _ended(self, event: dict[str, Any]) -> Message | None:
        try:
            experiment = self.pool.state.experiment(event["experiment_id"])
        except NotFound:
            return None
        hours = experiment.gpu_seconds / 3600
        attempts = len(self.pool.state.attempts(experiment.id))
        verb = "finished" if event["kind"] == ExperimentState.SUCCEEDED else "failed"
        return Message(f"gpupool: {experiment.name} {verb}",
                       f"{experiment.id} {verb}: {event['message']} ({attempts} session(s), "
                       f"{hours:.2f} GPU-hours). `gpupool status {experiment.id}` shows it.")

    def _waiting(self, event: dict[str, Any]) -> Message | None:
        """A submitted attempt that waits for a person to open it (Colab's free tier)."""
        try:
            attempt = self.pool.state.attempt(event["attempt_id"])
        except NotFound:
            return None
        provider = self.pool.try_provider(attempt.provider)
        if provider is None or provider.capabilities.needs_person is None or not attempt.url:
            return None
        name = self.pool.state.experiment(attempt.experiment_id).name
        owner = provider.owner_of(attempt.account)  # a team's member: the one who can open it
        whose = f" in {owner}'s account ({attempt.account})" if owner else ""
        return Message(f"gpupool: {owner + ', ' if owner else ''}open this notebook for {name}",
                       f"{attempt.provider} session {attempt.seq} of {name}{whose} waits for you: "
                       f"open {attempt.url}, choose a GPU runtime and press Run all.",
                       to=tuple(provider.notify_urls(attempt.account)))

    # -- where it got to -------------------------------------------------------------------

    def _new_events(self) -> list[dict[str, Any]]:
        query = db.events.select().where(db.events.c.id > self.cursor).order_by(db.events.c.id)
        with self.pool.state.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def _load_cursor(self) -> int:
        try:
            return int(json.loads(self.cursor_file.read_text())["last_event_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # first start: what happened before is not news; kept at once, so that a scheduler
        # started again and again (`daemon --once` from cron) sends what happened in between
        latest = self._latest_event_id()
        self._save_cursor(latest)
        return latest

    def _latest_event_id(self) -> int:
        with self.pool.state.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(db.events.c.id), 0)))
                       .scalar_one())

    def _save_cursor(self, event_id: int) -> None:
        self.cursor = event_id
        self.cursor_file.parent.mkdir(parents=True, exist_ok=True)
        staging = self.cursor_file.with_suffix(".tmp")
        staging.write_text(json.dumps({"last_event_id": event_id}))
        os.replace(staging, self.cursor_file)


def _members_notified(pool: Pool) -> bool:
    """Whether some provider account in the pool file names its owner's own notify URLs."""
    return any(entry.get("notify") for section in pool.settings.providers.values()
               for entry in (section.get("accounts") or {}).values())
