"""The ``providers.colab`` section of the pool configuration, and where credentials live."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, field_validator, model_validator

from gpupool.accounts import AccountSection, checked_accounts
from gpupool.durations import Seconds
from gpupool.provider_config import ProviderConfig

CONFIG_DIR = Path(platformdirs.user_config_dir("gpupool")) / "colab"
DEFAULT_CLIENT_SECRETS = CONFIG_DIR / "client_secrets.json"
DEFAULT_CREDENTIALS = CONFIG_DIR / "credentials.json"


class ColabAccount(AccountSection):
    """One team member's Google account: their saved Drive sign-in. Its notebooks go to their
    Drive, and they are the person who opens and runs them (the one notified)."""

    credentials_file: Path = Field(description="that member's saved sign-in (gpupool auth colab "
                                   "writes it on their machine)")
    client_secrets: Path | None = Field(None, description="their OAuth client, if not the section's")
    folder: str | None = Field(None, description="folder in their My Drive (default: the section's)")
    estimated_gpu_hours_per_day: float | None = Field(None, gt=0)


class ColabConfig(ProviderConfig):
    """The ``providers.colab`` section (the fields every provider has are in ``ProviderConfig``;
    a free Colab session is capped at 12 h and a person opens each one)."""

    client_secrets: Path = Field(DEFAULT_CLIENT_SECRETS,
                                 description="OAuth client (Desktop app) JSON from the Cloud console")
    credentials_file: Path = Field(DEFAULT_CREDENTIALS,
                                   description="saved user credentials (written by gpupool auth colab)")
    folder: str = Field("gpupool", description="folder in My Drive holding gpupool's files")
    max_concurrent: int = Field(1, ge=1, description="sessions at once per account (a person "
                                "runs each notebook in a browser tab)")
    session_seconds: Seconds = Field(12 * 3600, gt=0, description="Colab's free session cap")
    start_timeout: Seconds = Field(1800, gt=0, description="withdraw if nobody runs it in time")
    heartbeat_seconds: Seconds = Field(30, gt=0, description="how often the notebook reports")
    heartbeat_timeout: Seconds = Field(600, gt=0, description="silence after which it is lost")
    no_gpu_cooldown: Seconds = Field(6 * 3600, ge=0, description="rest after 'no GPU' reports")
    drive_full_cooldown: Seconds = Field(3600, ge=0, description="rest after 'Drive full' reports")
    estimated_gpu_hours_per_day: float = Field(4.0, gt=0,
                                               description="Colab publishes none: a guess")
    startup_seconds: Seconds = Field(300, ge=0, description="a person has to open it")
    upload_chunk_bytes: int = Field(8 * 1024 * 1024, ge=256 * 1024)
    request_timeout: Seconds = Field(60, gt=0,
                                     description="seconds before a stalled Drive request is retried")
    gpu_probe: str = Field("nvidia-smi -L", description="command that succeeds when a GPU is there")
    accounts: dict[str, ColabAccount] = Field(
        default_factory=dict, description="a team's members' own Google accounts, by a short "
        "name; empty: the one signed in with gpupool auth colab (account 'default')")

    @field_validator("accounts")
    @classmethod
    def _one_account_per_person(cls, accounts: dict[str, ColabAccount]) -> dict[str, ColabAccount]:
        return checked_accounts(accounts, _sign_in)

    @model_validator(mode="after")
    def _members_own_credentials(self) -> ColabConfig:
        if self.accounts and "credentials_file" in self.model_fields_set:
            raise ValueError("with accounts listed, give credentials_file under each account "
                             "(each member's own sign-in)")
        return self


def _sign_in(entry: AccountSection) -> object:
    """The Google sign-in an account uses: its saved credentials file."""
    assert isinstance(entry, ColabAccount)
    return str(Path(entry.credentials_file).expanduser().resolve())
