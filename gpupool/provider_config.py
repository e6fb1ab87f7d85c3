"""What every provider adapter declares about itself, once: the settings all of them share
(``ProviderConfig``), what it can and cannot do (``Capabilities``) and how ``gpupool plan``
should simulate it (``ProviderModel``).

The scheduler, the CLI and the forecast read these, never a provider's name, so an adapter
added by a third party through the ``gpupool.providers`` entry-point group is treated like the
built-in ones. An adapter subclasses ``ProviderConfig`` for its pool section and overrides a
field to change its default (Kaggle's sessions are planned at 9 h, local ones start in 5 s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from gpupool.durations import Seconds
from gpupool.session.contract import deadline_margin

DEFAULT_LOSS_PRIOR_SECONDS = 6 * 3600.0  # before any loss is seen: one every 6 h (pessimistic)

# (available now, epoch seconds when that changes or None): an adapter's own calendar rule
OpenAt = Callable[[float], tuple[bool, float | None]]
# (start of the quota window holding ``now``, epoch when it resets or None for a rolling one)
QuotaWindow = Callable[[float], tuple[float, float | None]]


class ProviderConfig(BaseModel):
    """The fields every provider section of the pool file has; adapters subclass it.

    Unknown keys are refused (``extra="forbid"``), so a misspelt key is reported with its field
    and line instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false: never place an attempt here")
    max_concurrent: int | None = Field(1, ge=1, description="sessions at once per account "
                                       "(null: no limit)")
    session_seconds: Seconds | None = Field(None, gt=0, description="seconds a session may "
                                            "last here, the provider's cap (null: no cap)")
    deadline_margin: Seconds | None = Field(None, ge=0, description="seconds before the cap at "
                                            "which the trainer is told to save and stop "
                                            "(null: min(600 s, 10% of the cap))")
    startup_seconds: Seconds = Field(60.0, ge=0, description="seconds from submit to training, "
                                     "assumed by placement and the forecast")
    loss_prior_seconds: Seconds = Field(
        DEFAULT_LOSS_PRIOR_SECONDS, gt=0, description="assumed mean seconds between unplanned "
        "session losses before any is observed (checkpoint interval, forecast); e.g. 72h")

    @property
    def margin(self) -> float:
        """Seconds kept before the cap for the last checkpoint: ``deadline_margin`` if set,
        else the one default rule (``gpupool.session.contract.deadline_margin``)."""
        return deadline_margin(self.session_seconds, self.deadline_margin)

    @property
    def planned_seconds(self) -> float | None:
        """Seconds of a session the trainer may use: the cap less the margin (None: no cap)."""
        if self.session_seconds is None:
            return None
        return max(0.0, self.session_seconds - self.margin)


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do, as data the core reads (SkyPilot keeps its clouds' features so).

    ``needs_person``: why a person must start each session (None: it starts unattended); the
    notifier tells that person, the forecast simulates them. ``exact_quota``: ``quota()``
    answers from the service or the ledger; False means a guess, which must never cut a session
    short. ``cpu_fallback``: with no GPU, a GPU experiment may train on the CPU here (see
    ``Provider.accepts_cpu``). ``interactive_sign_in``: ``gpupool auth NAME`` calls the
    adapter's ``authorize``.
    """

    needs_person: str | None = None
    exact_quota: bool = True
    cpu_fallback: bool = False
    interactive_sign_in: bool = False


@dataclass(frozen=True)
class ProviderModel:
    """One provider as ``gpupool plan`` simulates it; adapters build it (``forecast_model``)
    from their own settings and calendar rules, so the forecast reads what the scheduler does.
    Times are seconds, instants epoch seconds."""

    name: str
    session_seconds: float | None = None  # planned session length (cap minus margin); None: no cap
    startup_seconds: float = 60.0
    loss_hours: float | None = None  # mean hours between unplanned losses; None: never lost
    quota_seconds: float | None = None  # GPU seconds per quota window; None: unlimited
    quota_window: QuotaWindow | None = None  # the adapter's window rule (Kaggle's week...)
    open_at: OpenAt | None = None  # the adapter's availability calendar (local windows)
    needs_person: bool = False  # somebody must open each session (Colab's notebook)
    start_timeout: float = 1800.0  # seconds a session may wait for that person
    cpu_only_ok: bool = False  # with no GPU, trains a GPU experiment on the CPU (local fallback)
