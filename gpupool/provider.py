"""The one interface every provider adapter implements, and how adapters are found.

Adapters are light objects built from their section of the pool configuration (a
``ProviderConfig`` subclass). What an adapter can do is data (``capabilities``), and each maps
its remote status strings to ``AttemptState`` in one dict (``status_map``). Adapters are
discovered through the ``gpupool.providers`` entry-point group and imported only when first
used, so a third party can add one without touching the core and ``import gpupool`` loads no
provider SDK.
"""

from __future__ import annotations

import abc
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError

from gpupool.clock import SYSTEM_CLOCK, Clock, as_clock
from gpupool.errors import ConfigError, InputUnavailable, SpecError
from gpupool.lifecycle import AttemptState
from gpupool.manifest import Manifest
from gpupool.provider_config import Capabilities, ProviderConfig, ProviderModel
from gpupool.session import contract

if TYPE_CHECKING:
    from gpupool.inputs import InputSources
    from gpupool.spec import ExperimentSpec, InputSpec
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore

ENTRY_POINT_GROUP = "gpupool.providers"


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    until: float | None = None  # epoch seconds when it may change, if known


@dataclass(frozen=True)
class Quota:
    """GPU time of one account in its current window."""

    used_seconds: float
    total_seconds: float | None  # None: unlimited
    resets_at: float | None = None
    source: str = "ledger"  # "api", "ledger" or "estimate"

    @property
    def remaining_seconds(self) -> float | None:
        if self.total_seconds is None:
            return None
        return max(0.0, self.total_seconds - self.used_seconds)


@dataclass(frozen=True)
class Launch:
    """Everything a provider needs to start one attempt."""

    attempt_id: str
    experiment_id: str
    account: str
    spec: ExperimentSpec
    bundle: Path  # the experiment's code as a .tar.gz (see gpupool.bundle)
    store: CheckpointStore  # the experiment's checkpoints
    restore: Manifest | None  # the verified checkpoint to resume from, if any
    checkpoint_interval: float
    now: float
    extra_env: dict[str, str] = field(default_factory=dict)
    quota_seconds: float | None = None  # GPU time left on the account, if limited


@dataclass(frozen=True)
class Submission:
    remote_id: str
    url: str | None = None  # e.g. the Colab link a person must open
    message: str | None = None
    deadline: float | None = None  # when the session will be cut (epoch), if known


@dataclass(frozen=True)
class PollResult:
    state: AttemptState
    step: int | None = None
    heartbeat: float | None = None
    rate: float | None = None  # steps per second
    total: int | None = None  # the run's total steps, when the script reports it
    started_at: float | None = None
    message: str | None = None  # why it ended, or what it waits for
    metrics: dict[str, float] | None = None  # the latest metrics the script reported
    checkpoint: str | None = None  # the newest checkpoint this session published (its name)
    checkpoint_at: float | None = None  # when it was published (epoch seconds, session clock)
    # With UNAVAILABLE: until when the provider says the account cannot be used (epoch
    # seconds; None: the scheduler backs off), and whether it said the GPU quota is used up.
    # The scheduler records the cool-down in the state database (``State.cool_down``).
    unavailable_until: float | None = None
    quota_spent: bool = False
    # With FAILED: no other attempt can do better (the session found an input gone or
    # wrong), so the experiment fails now instead of retrying (README, "Inputs").
    final: bool = False


class Provider(abc.ABC):
    """A place where attempts run. Subclasses set ``name``, ``Config`` (a ``ProviderConfig``
    subclass) and ``capabilities``, and implement the abstract methods.

    Times are epoch seconds, durations seconds. Methods that talk to a service raise
    ``ProviderError`` subclasses (``ProviderUnavailable``, ``CredentialsError``,
    ``CancelFailed``...) from ``gpupool.errors``, never a client library's own exceptions.
    """

    name: ClassVar[str]
    status_map: ClassVar[dict[str, AttemptState]] = {}
    capabilities: ClassVar[Capabilities] = Capabilities()
    input_kinds: ClassVar[frozenset[str]] = frozenset()  # inputs: sources it can bring in
    Config: ClassVar[type[ProviderConfig]]

    def __init__(self, config: ProviderConfig, data_dir: Path,
                 clock: Clock | Callable[[], float] = SYSTEM_CLOCK):
        """``clock``: the time the adapter reads and sleeps on (``gpupool.clock``); a bare
        function of epoch seconds replaces the wall time only."""
        self.config = config
        self.data_dir = Path(data_dir)
        self.clock = as_clock(clock)

    account_owner: str | None = None  # the person whose account this is, when the pool names one
    account_notify: list[str] = []  # apprise URLs reaching that person (never shown: secrets)

    @classmethod
    def config_from_section(cls, section: dict[str, Any]) -> ProviderConfig:
        """``providers.<name>`` of the pool file as this adapter's ``Config``. Raises
        ``SpecError`` naming each bad field as ``providers.<name>.<field>``."""
        try:
            return cls.Config.model_validate(section)
        except ValidationError as err:
            problems = [(f"providers.{cls.name}." + ".".join(map(str, e["loc"])), e["msg"])
                        for e in err.errors()]
            raise SpecError("pool configuration", problems) from None

    @classmethod
    def from_section(cls, section: dict[str, Any], data_dir: Path, clock: Clock) -> Provider:
        """The adapter for ``providers.<name>``: one adapter, or one per account listed under
        ``accounts`` (see ``TeamAccounts``). Raises ``SpecError`` naming each bad field."""
        config = cls.config_from_section(section)
        if not getattr(config, "accounts", None):  # only some adapters have team accounts
            return cls(config, data_dir, clock)
        from gpupool.accounts import team_of

        return team_of(cls, config, data_dir, clock)

    # -- what the provider offers --------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False when the pool file disables the provider: nothing is placed on it."""
        return self.config.enabled

    def accounts(self) -> list[str]:
        """The accounts attempts may run on: ``["default"]`` unless the section lists members'."""
        return ["default"]

    def check_account(self, account: str) -> tuple[bool, str]:
        """(usable, hint) for one account's credentials; one account: ``check_credentials``."""
        return self.check_credentials()

    def owner_of(self, account: str) -> str | None:
        """The person an account belongs to, as the pool file names them (None: not named)."""
        return self.account_owner

    def login(self) -> str | None:
        """Who the credentials sign in as (a user name), when it is known without a request;
        a team's pool refuses a second account that signs in as the same person."""
        return None

    def notify_urls(self, account: str) -> list[str]:
        """Apprise URLs reaching the account's owner (from the pool file; they carry secrets)."""
        return list(self.account_notify)

    def authorize(self, **options: Any) -> str:
        """The one interactive sign-in (``gpupool auth NAME``), for adapters whose
        ``capabilities.interactive_sign_in`` is true; returns what was done, in a sentence.
        ``options`` are the CLI's (``launch_browser``, ``paste``, ``username``, ``key_file``,
        ``prompt``, ``echo``); an adapter ignores those meant for others. Raises
        ``ConfigError`` here (no sign-in step) and ``CredentialsError`` when signing in fails."""
        raise ConfigError(f"{self.name} has no sign-in step (see `gpupool providers`)")

    def max_concurrent(self, account: str) -> int | None:
        """Sessions that may run at once on ``account`` (None: no limit); from the config."""
        return self.config.max_concurrent

    def session_seconds(self) -> float | None:
        """The longest a session may last here in seconds (the provider's cap), None if
        unlimited; from the config's ``session_seconds``."""
        return self.config.session_seconds

    def planned_session_seconds(self, launch: Launch) -> float | None:
        """How long this attempt's session may run (seconds): the provider's cap, shortened to
        the quota left, so the runtime saves before the quota (not only the cap) cuts it."""
        limits = [s for s in (self.session_seconds(), launch.quota_seconds) if s is not None]
        return min(limits) if limits else None

    def gpu_kinds(self) -> set[str] | None:
        """GPU kinds this provider can give (lowercase names), an empty set when it has none,
        None if it cannot tell."""
        return None

    def accepts_cpu(self) -> bool:
        """Whether a GPU experiment placed here now trains on the CPU: the adapter may fall
        back (``capabilities.cpu_fallback``) and it has no GPU (``gpu_kinds()`` is empty)."""
        return self.capabilities.cpu_fallback and self.gpu_kinds() == set()

    def startup_seconds(self) -> float:
        """Seconds from submit until training runs (placement and the forecast add it)."""
        return self.config.startup_seconds

    def loss_prior_seconds(self) -> float:
        """Assumed mean seconds between unplanned session losses before any is observed."""
        return self.config.loss_prior_seconds

    def forecast_model(self) -> ProviderModel:
        """How ``gpupool plan`` simulates this provider, from the same settings the scheduler
        reads (planned session = cap less margin, start-up, loss prior, capabilities). Adapters
        with a quota or a calendar override it to add their own rule (Kaggle's week, local
        windows), so the forecast reuses the adapter's code instead of a copy."""
        return ProviderModel(
            self.name, self.config.planned_seconds, self.startup_seconds(),
            loss_hours=self.loss_prior_seconds() / 3600,
            needs_person=self.capabilities.needs_person is not None,
            cpu_only_ok=self.capabilities.cpu_fallback)

    @abc.abstractmethod
    def check_credentials(self) -> tuple[bool, str]:
        """(usable, hint): whether credentials are found and work, and what to do if not.
        Answers rather than raises: a failed check is ``(False, what to do)``."""

    def availability(self, account: str, now: float) -> Availability:
        """Whether ``account`` can take a session at ``now`` (epoch seconds) by the provider's
        own rules (a local time window...), why not, and until when (``Availability.until``,
        epoch seconds) when that is known. Refusals it reported are cool-downs the scheduler
        keeps in the state database, not here (``PollResult.unavailable_until``,
        ``ProviderUnavailable.until``)."""
        return Availability(True)

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        """The account's GPU time in its current window (seconds), None if unlimited.
        ``charged``: GPU-seconds the ledger charged it since ``quota_window_start(now)``. Only
        ``gpupool.quota.gpu_seconds_left`` calls this; everyone else asks that. Raises nothing
        for a service that cannot be asked: it falls back to the ledger."""
        return None

    def quota_window_start(self, now: float) -> float:
        """Start (epoch seconds) of the window the ledger sums over (Kaggle's week, a rolling
        day...); 0.0 when the quota has no window."""
        return 0.0

    def check_inputs(self, spec: ExperimentSpec) -> list[tuple[tuple[Any, ...], str]]:
        """Problems with ``spec.inputs`` for this provider, as (field location, message); run
        before anything is placed. The default refuses the kinds not in ``input_kinds``."""
        return [(("inputs", name, item.kind),
                 f"{self.name} cannot bring {item.kind} inputs into a session yet; "
                 f"remove {self.name} from providers or use another kind of source")
                for name, item in spec.inputs.items() if item.kind not in self.input_kinds]

    # -- attempts ------------------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, launch: Launch) -> Submission:
        """Start the attempt and say where it runs (``Submission.remote_id``, a URL for a
        person, the deadline in epoch seconds when known). Must be idempotent per
        ``launch.attempt_id``: a scheduler that crashed after submitting calls it again.
        Raises ``ProviderUnavailable`` for no capacity, ``CredentialsError`` for bad keys,
        ``InputUnavailable`` when an input cannot be brought in."""

    @abc.abstractmethod
    def poll(self, attempt: Attempt, now: float) -> PollResult:
        """The attempt's state at ``now`` (epoch seconds), with progress when known (step,
        heartbeat, steps per second, metrics, newest checkpoint). Raises ``ProviderError``
        when the service cannot be asked; the scheduler then tries again later."""

    @abc.abstractmethod
    def cancel(self, attempt: Attempt) -> None:
        """Stop the attempt's session (idempotent; a session already ended is left alone).

        Return only when a stop was really requested or confirmed. Raise ``CancelFailed``
        (with ``action``: what the person must do) when the session cannot be stopped: no API
        for it, or the stop call still failed after bounded retries. The scheduler then keeps
        tracking and charging the session until it ends. Also called for every attempt that
        ended LOST, so a session gpupool gave up on is told to stop."""

    @abc.abstractmethod
    def logs(self, attempt: Attempt) -> str:
        """The attempt's log text so far (kept readable after the session ends); "" when
        there is none yet. Raises ``ProviderError`` when the service cannot be asked."""

    @abc.abstractmethod
    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        """Collect the checkpoints this attempt produced into ``store``, each verified by
        sha256, and return their manifests (newest first); idempotent. A torn or corrupt
        checkpoint is skipped, never published; raises ``ProviderError`` when the service
        cannot be read (the scheduler collects again later)."""

    def cleanup(self, attempt: Attempt) -> None:  # noqa: B027 - optional hook, no-op by default
        """Free remote resources after the attempt's checkpoints are collected (idempotent;
        failures are logged by the adapter, not raised)."""

    def release(self, ended: Callable[[str], bool], now: float) -> None:  # noqa: B027
        """Free what the provider keeps for whole experiments (uploaded code and inputs) once
        ``ended(experiment_id)`` says that experiment is over (succeeded, failed or cancelled,
        no session still running). Called by the scheduler after every step, so it must be
        cheap when there is nothing to free. Optional hook, no-op by default."""

    # -- inputs whose source lives at this provider -------------------------------------------

    input_sources: ClassVar[frozenset[str]] = frozenset()  # input kinds it downloads for others
    sources: InputSources | None = None  # set by the pool: asks the adapter owning a kind

    def download_input(self, item: InputSpec, dest: Path) -> Path:
        """Bring input ``item`` (of a kind in ``input_sources``) onto this machine for another
        provider's session, and return the file or folder holding its content.

        ``dest`` is a folder this adapter alone writes for this one source (under the pool's
        data dir). The adapter asks the service which version of the source is current and
        downloads only when ``dest`` does not hold that version complete already (a marker
        written last says so), so a second attempt or experiment downloads nothing. Downloads
        show progress, resume after a cut where the service allows it, and are verified
        against the hashes the service gives (Drive's md5, a zip's CRC-32). Credentials come
        from the adapter's usual places.

        Raises InputUnavailable when the source does not exist or this account cannot read
        it (retrying elsewhere cannot help); ProviderError when the service fails."""
        raise InputUnavailable(self.name, f"{self.name} cannot download {item.kind} inputs")


def runtime_env(launch: Launch, *, provider: str, session_dir: str | None = None,
                restore_dir: str | None = None) -> dict[str, str]:
    """The variables gpupool.runtime and the session's supervisor read (the names of
    ``gpupool.session.contract``), plus the experiment's env. ``session_dir`` and
    ``restore_dir`` are left out when None (a remote session sets them where it runs); the
    deadline is never here: the supervisor sets it when the session really starts."""
    env = dict(launch.spec.env)
    env.update({
        contract.ENV_EXPERIMENT: launch.experiment_id,
        contract.ENV_ATTEMPT: launch.attempt_id,
        contract.ENV_PROVIDER: provider,
        contract.ENV_INTERVAL: str(launch.checkpoint_interval),
        contract.ENV_KEEP_LAST: str(launch.spec.checkpoint.keep_last),
    })
    if launch.spec.checkpoint.path is not None:  # the supervisor restores and snapshots these
        env[contract.ENV_CHECKPOINT_PATH] = launch.spec.checkpoint.path
        env[contract.ENV_SNAPSHOT_SETTLE] = str(launch.spec.checkpoint.settle)
    if launch.spec.outputs:
        env[contract.ENV_OUTPUTS] = json.dumps(list(launch.spec.outputs))
    if session_dir:
        env[contract.ENV_SESSION_DIR] = session_dir
    if restore_dir:
        env[contract.ENV_RESTORE_DIR] = restore_dir
    env.update(launch.extra_env)
    return env


STOPPED_BY = {  # exit.json's "stopped_by": who stopped the user's command, in words
    contract.STOPPED_BY_DEADLINE: "stopped at the session deadline",
    contract.STOPPED_BY_SIGNAL: "stopped by a SIGTERM from outside the session (the platform, or a cancel)",
}
KILLED_CODES = {128 + signal.SIGKILL: signal.SIGKILL, 128 + signal.SIGTERM: signal.SIGTERM}


def classify_exit(returncode: int | None, outcome: str | None,
                  stopped_by: str | None = None) -> tuple[AttemptState, str]:
    """How a session ended, from what its supervisor wrote in ``exit.json``.

    ``returncode`` is the user's command's exit status (negative: killed by that signal; None:
    unknown), ``outcome`` what the runtime wrote in ``outcome.json`` ("done" or "yield"), and
    ``stopped_by`` who stopped the command: None (nobody in gpupool), "deadline" (the
    supervisor, at the session's hard end) or "signal" (a SIGTERM from outside the session,
    which the supervisor forwarded). The rule (README, "How a session ends"): FAILED, the
    user's error, is only the command exiting non-zero on its own, or killed by a signal that
    neither gpupool nor the platform sent while the supervisor lived (the OOM killer); a stop
    sent by the supervisor or the platform is LOST, or YIELDED when the script saved and
    yielded. A session with no ``exit.json`` at all is LOST (the provider says so). A
    provider must forward ``stopped_by`` from ``exit.json``: without it, a command the
    platform killed through the supervisor reads as killed by nobody (FAILED).
    """
    if outcome == contract.OUTCOME_DONE and returncode in (0, None):
        return AttemptState.SUCCEEDED, "training completed"
    stopper = STOPPED_BY.get(stopped_by or "")
    if outcome == contract.OUTCOME_YIELD or returncode == contract.EXIT_YIELD:
        why = stopper or "before the session deadline"
        return AttemptState.YIELDED, f"the script saved a checkpoint and yielded ({why})"
    if stopper is not None:
        return AttemptState.LOST, f"{stopper}; the run command then ended with {_status(returncode)}"
    if returncode == 0:
        return AttemptState.SUCCEEDED, "the run command exited 0"
    if returncode is None:
        return AttemptState.LOST, "the session ended without an exit status"
    signum = -returncode if returncode < 0 else KILLED_CODES.get(returncode)
    if signum is not None:
        return AttemptState.FAILED, (
            f"the training process was killed by {_signal_name(signum)}, which neither gpupool "
            f"nor the platform sent (the out-of-memory killer?)")
    return AttemptState.FAILED, f"the run command failed with exit code {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return f"signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"


def _status(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        return _signal_name(-returncode)
    return f"exit code {returncode}"


# -- discovery ---------------------------------------------------------------------------

def available_providers() -> dict[str, metadata.EntryPoint]:
    """Provider names found through the ``gpupool.providers`` entry points, each with its
    entry point (nothing imported yet)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_provider_class(name: str) -> type[Provider]:
    """The adapter class registered as ``name`` in the ``gpupool.providers`` entry-point group,
    imported now. Raises ``ConfigError`` for an unknown name, an import that fails (with what
    to reinstall), or an entry point that is not a ``Provider`` with a ``ProviderConfig``."""
    entry = available_providers().get(name)
    if entry is None:
        known = ", ".join(sorted(available_providers())) or "none"
        raise ConfigError(f"unknown provider {name!r} (installed: {known})")
    try:
        cls = entry.load()
    except ImportError as err:
        raise ConfigError(
            f"provider {name!r} could not be imported ({err}); reinstall gpupool "
            f"or the package that provides it"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"entry point {name!r} does not name a gpupool Provider")
    if not issubclass(getattr(cls, "Config", object), ProviderConfig):
        raise ConfigError(f"provider {name!r}: its Config must subclass "
                          "gpupool.provider_config.ProviderConfig (the fields every provider has)")
    return cls
