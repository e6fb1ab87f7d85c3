"""The ``providers.kaggle`` section of the pool configuration."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from gpupool.accounts import AccountSection, checked_accounts
from gpupool.durations import Seconds
from gpupool.provider_config import ProviderConfig

KAGGLE_CAP_SECONDS = 12 * 3600  # Kaggle's hard limit for a GPU session
KAGGLE_GPU_SESSIONS = 2  # Kaggle's "maximum batch GPU session count" per account
WEEK = 7 * 86400.0  # Kaggle's GPU quota is per week


def week_start(now: float) -> float:
    """Start (epoch seconds) of Kaggle's quota week holding ``now``: Saturday 00:00 UTC, in any
    local time zone. The one copy of the rule: the adapter's ledger and the forecast use it."""
    day = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0,
                                                                  microsecond=0)
    days_since_saturday = (day.weekday() - 5) % 7
    return (day - dt.timedelta(days=days_since_saturday)).timestamp()


def week_window(now: float) -> tuple[float, float | None]:
    """(start, reset) of the quota week holding ``now``, epoch seconds (see ``week_start``)."""
    start = week_start(now)
    return start, start + WEEK


class KaggleAccount(AccountSection):
    """One team member's Kaggle account: their token, and who they are."""

    credentials: Path | None = Field(None, description="that member's kaggle.json, or the folder "
                                     "holding it (a KAGGLE_CONFIG_DIR)")
    username: str | None = Field(None, description="their Kaggle user; default: from the token")
    max_concurrent: int | None = Field(None, ge=1, le=KAGGLE_GPU_SESSIONS,
                                       description="GPU sessions at once on this account")
    weekly_gpu_hours: float | None = Field(None, gt=0, description="quota assumed when the API fails")


class KaggleConfig(ProviderConfig):
    """Settings of the Kaggle provider; every field has a default that suits a free account
    (the fields every provider has are in ``ProviderConfig``; some defaults differ here).

    ``enable_internet`` defaults to True (the kaggle client's own default) because an
    experiment's ``setup`` usually pip-installs something; set it to false for experiments
    whose code needs nothing beyond Kaggle's image, so a session cannot reach the network.
    """

    username: str | None = Field(None, description="the Kaggle user; default: from the credentials")
    credentials: Path | None = Field(None, description="a kaggle.json to use instead of the usual places")
    accelerator: str | None = Field("NvidiaTeslaT4", description="machine_shape; null: CPU only")
    enable_internet: bool = True
    public: bool = Field(False, description="make kernels and datasets public (never by default)")
    session_seconds: Seconds = Field(9 * 3600, gt=0, le=KAGGLE_CAP_SECONDS,
                                   description="plan sessions this long (Kaggle cuts at 12 h)")
    max_concurrent: int = Field(KAGGLE_GPU_SESSIONS, ge=1, le=KAGGLE_GPU_SESSIONS,
                                description="Kaggle runs 2 GPU sessions at a time per account")
    weekly_gpu_hours: float = Field(30.0, gt=0, description="quota assumed when the API fails")
    request_timeout: Seconds = Field(60.0, gt=0, description="seconds per HTTP request")
    download_timeout: Seconds = Field(300.0, gt=0, description="seconds of silence in a download")
    live_log_seconds: Seconds = Field(5.0, gt=0, description="at most this long reading a running "
                                      "session's live log (Kaggle streams it until the end)")
    live_log_idle_seconds: Seconds = Field(1.0, gt=0, description="a live log read stops after "
                                           "this long without a new line")
    max_retries: int = Field(5, ge=0)
    backoff_base: Seconds = Field(1.0, ge=0, description="first retry delay; doubles each time")
    backoff_max: Seconds = Field(60.0, ge=0)
    dataset_ready_timeout: Seconds = Field(600.0, gt=0, description="seconds a new dataset may "
                                         "take to read READY (404 until then is not-ready-yet)")
    push_settle_seconds: Seconds = Field(300.0, gt=0, description="seconds to keep asking whether "
                                       "a push that got no clear answer started a kernel")
    dataset_poll_seconds: Seconds = Field(5.0, ge=0)
    slug_prefix: str = Field("gpupool", pattern=r"^[a-z0-9][a-z0-9-]{0,19}$")
    keep_remote_objects: bool = Field(False, description="keep each attempt's kernel and inputs "
                                      "dataset on Kaggle after collecting it (they use your "
                                      "private storage); default: delete them")
    unused_input_days: float = Field(7.0, ge=0, description="keep an uploaded local input this "
                                     "many days after the last experiment using it ended (a "
                                     "re-run uploads nothing), then delete it")
    startup_seconds: Seconds = Field(180.0, ge=0, description="seconds of queue and image start")
    loss_prior_seconds: Seconds = Field(72 * 3600.0, gt=0, description="assumed mean seconds "
                                        "between unplanned session losses: Kaggle rarely drops one")
    accounts: dict[str, KaggleAccount] = Field(
        default_factory=dict, description="a team's members' own accounts, by a short name; "
        "empty: the one account found as the kaggle client finds it (account 'default')")

    @field_validator("accounts")
    @classmethod
    def _one_account_per_person(cls, accounts: dict[str, KaggleAccount]) -> dict[str, KaggleAccount]:
        checked_accounts(accounts, _identity)
        missing = [name for name, entry in accounts.items() if entry.credentials is None]
        if len(accounts) > 1 and missing:
            raise ValueError(f"{', '.join(map(repr, missing))}: each member's own credentials "
                             "(their kaggle.json) are needed")
        return accounts

    @model_validator(mode="after")
    def _members_own_credentials(self) -> KaggleConfig:
        if self.accounts and {"credentials", "username"} & self.model_fields_set:
            raise ValueError("with accounts listed, give credentials and username under each "
                             "account (they are each member's own)")
        return self


def _identity(entry: AccountSection) -> object:
    """The login an account uses: its username if given, else its credentials file."""
    assert isinstance(entry, KaggleAccount)
    if entry.username:
        return ("user", entry.username.lower())
    if entry.credentials is not None:
        return ("file", str(Path(entry.credentials).expanduser().resolve()))
    return None
