"""A team's accounts: a provider section that lists several members' own accounts.

The free tiers allow one account per provider per person (Kaggle's terms; Colab's FAQ forbids
several accounts to get around its limits), so a pool lists several accounts only for a team
whose members each bring their own. Each account names its owner and carries that person's
credentials; the core then places, charges, cools down and reports per (provider, account).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpupool.errors import ConfigError
from gpupool.provider import Availability, Clock, Launch, PollResult, Provider, Quota, Submission
from gpupool.provider_config import ProviderConfig, ProviderModel

if TYPE_CHECKING:
    from gpupool.manifest import Manifest
    from gpupool.state import Attempt
    from gpupool.store import CheckpointStore


class AccountSection(BaseModel):
    """One member's account in a provider section's ``accounts`` map: whose it is and what
    differs from the section (their credentials, their limits). Providers subclass it with
    their credential fields; a field left out takes the section's value."""

    model_config = ConfigDict(extra="forbid")
    owner: str = Field(min_length=1, description="the one person this account belongs to")
    max_concurrent: int | None = Field(None, ge=1, description="sessions at once on this account "
                                       "(default: the section's)")
    notify: list[str] = Field(default_factory=list, description="apprise URLs that reach this "
                              "person when an attempt waits for them (besides the pool's)")

    @field_validator("notify")
    @classmethod
    def _notify(cls, urls: list[str]) -> list[str]:
        from gpupool.notify import invalid_urls

        bad = invalid_urls(urls)
        if bad:  # the URLs themselves are never shown: they usually carry a token
            raise ValueError(f"entries {', '.join(map(str, bad))} are not notification URLs "
                             "apprise knows (e.g. ntfy://topic, mailto://user:pass@host)")
        return urls


ACCOUNT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # fits the state tables' account column


AccountsT = TypeVar("AccountsT", bound="Mapping[str, AccountSection]")


def check_account_names(accounts: Mapping[str, AccountSection]) -> None:
    """Raise ``ValueError`` for an account name the state tables cannot hold."""
    for name in accounts:
        if not re.fullmatch(ACCOUNT_NAME, name):
            raise ValueError(f"account name {name!r}: use letters, digits, '_', '.', '-' "
                             "(at most 64, starting with a letter or digit)")


def checked_accounts(accounts: AccountsT, identity: Callable[[AccountSection], object] | None = None
                     ) -> AccountsT:
    """A provider section's ``accounts``, checked (its ``field_validator`` returns this): names
    the state tables can hold, one account per person. Raises ``ValueError``, which pydantic
    reports at the section's line."""
    check_account_names(accounts)
    one_account_per_person(accounts, identity)
    return accounts


def one_account_per_person(accounts: Mapping[str, AccountSection],
                           identity: Callable[[AccountSection], object] | None = None) -> None:
    """Raise ``ValueError`` (pydantic reports it at the section) when two accounts belong to the
    same person, or share one identity (the same credentials): the free tiers' terms allow one
    account per provider per person, and one login listed twice would double its sessions."""
    seen: dict[object, str] = {}
    for account, entry in accounts.items():
        keys: list[tuple[str, object]] = [("owner", entry.owner.strip().lower())]
        ident = identity(entry) if identity is not None else None
        if ident is not None:
            keys.append(("credentials", ident))
        for key in keys:
            if key in seen:
                raise ValueError(f"accounts {seen[key]!r} and {account!r} have the same {key[0]}: "
                                 "each account belongs to one person, and a person brings one")
            seen[key] = account


def account_config(config: ProviderConfig, entry: AccountSection) -> ProviderConfig:
    """The section's settings with one member's own values over them, listing no accounts.
    A value left out or null is the section's (the pool file, once checked, spells out nulls)."""
    own = {key: getattr(entry, key) for key in entry.model_fields_set
           if key != "owner" and key in type(config).model_fields and getattr(entry, key) is not None}
    return config.model_copy(update={**own, "accounts": {}})


class TeamAccounts(Provider):
    """A provider section that lists several members' accounts: one adapter per account, each
    with its own client, caches, records and data folder (``<data_dir>/accounts/<name>``), and
    every call routed to the account it is about. Made per provider by ``team_class``."""

    def __init__(self, members: dict[str, Provider], config: ProviderConfig, data_dir: Path,
                 clock: Clock):
        super().__init__(config, data_dir, clock)
        self.members = members

    def member(self, account: str) -> Provider:
        """The adapter of ``account``; ``ConfigError`` when the pool file no longer lists it."""
        try:
            return self.members[account]
        except KeyError:
            raise ConfigError(f"providers.{self.name}.accounts has no account {account!r} "
                              f"(listed: {', '.join(self.members)}); put it back while its "
                              "attempts run") from None

    def _first(self) -> Provider:
        return next(iter(self.members.values()))

    def accounts(self) -> list[str]:
        return list(self.members)

    def owner_of(self, account: str) -> str | None:
        return self.member(account).account_owner

    def notify_urls(self, account: str) -> list[str]:
        return self.member(account).notify_urls(account)

    def authorize(self, **options: object) -> str:
        """``gpupool auth`` signs in one person: raise ``ConfigError`` saying how members do."""
        raise ConfigError(team_sign_in_hint(self.name, self.accounts(), "credentials_file"))

    def check_credentials(self) -> tuple[bool, str]:
        """Usable when every member's credentials are; the hint names each account."""
        checks = {account: self.check_account(account) for account in self.members}
        hint = "; ".join(f"{account} ({self.owner_of(account)}): {text}"
                         for account, (_, text) in checks.items())
        return all(ok for ok, _ in checks.values()), hint

    def check_account(self, account: str) -> tuple[bool, str]:
        """A member's own check; an account that signs in as an earlier one's person is refused
        (two entries for one login would double that person's sessions)."""
        member = self.member(account)
        login = member.login()
        for other, earlier in self.members.items():
            if other == account:
                break
            if login is not None and earlier.login() == login:
                return False, (f"account {account!r} signs in as {login}, like account {other!r}: "
                               "each person brings one account; remove one of them")
        return member.check_credentials()

    def max_concurrent(self, account: str) -> int | None:
        return self.member(account).max_concurrent(account)

    def session_seconds(self) -> float | None:
        return self._first().session_seconds()

    def planned_session_seconds(self, launch: Launch) -> float | None:
        return self.member(launch.account).planned_session_seconds(launch)

    def gpu_kinds(self) -> set[str] | None:
        return self._first().gpu_kinds()

    def accepts_cpu(self) -> bool:
        return self._first().accepts_cpu()

    def startup_seconds(self) -> float:
        return self._first().startup_seconds()

    def forecast_model(self) -> ProviderModel:
        """The first member's: the forecast simulates one account of a team."""
        return self._first().forecast_model()

    def loss_prior_seconds(self) -> float:
        return self._first().loss_prior_seconds()

    def availability(self, account: str, now: float) -> Availability:
        return self.member(account).availability(account, now)

    def quota(self, account: str, now: float, charged: float) -> Quota | None:
        """The member's own answer (``gpupool.quota.gpu_seconds_left`` combines it with the
        ledger and the running sessions of that account, and applies its cool-down)."""
        return self.member(account).quota(account, now, charged)

    def quota_window_start(self, now: float) -> float:
        """The members share one provider's rule for the window (epoch seconds)."""
        return self._first().quota_window_start(now)

    def submit(self, launch: Launch) -> Submission:
        return self.member(launch.account).submit(launch)

    def poll(self, attempt: Attempt, now: float) -> PollResult:
        return self.member(attempt.account).poll(attempt, now)

    def cancel(self, attempt: Attempt) -> None:
        self.member(attempt.account).cancel(attempt)

    def logs(self, attempt: Attempt) -> str:
        return self.member(attempt.account).logs(attempt)

    def collect(self, attempt: Attempt, store: CheckpointStore) -> list[Manifest]:
        return self.member(attempt.account).collect(attempt, store)

    def cleanup(self, attempt: Attempt) -> None:
        self.member(attempt.account).cleanup(attempt)

    def release(self, ended: Callable[[str], bool], now: float) -> None:
        for member in self.members.values():
            member.release(ended, now)


_TEAM_CLASSES: dict[type[Provider], type[TeamAccounts]] = {}


def team_class(cls: type[Provider]) -> type[TeamAccounts]:
    """``TeamAccounts`` under the provider's own name, status map and capabilities, so the
    core and the CLI treat a team's section like any other."""
    if cls not in _TEAM_CLASSES:
        _TEAM_CLASSES[cls] = type(f"{cls.__name__}Team", (TeamAccounts,), {
            "name": cls.name, "Config": cls.Config, "status_map": cls.status_map,
            "capabilities": cls.capabilities, "input_kinds": cls.input_kinds,
            "input_sources": cls.input_sources,
            "__module__": cls.__module__})
    return _TEAM_CLASSES[cls]


def team_sign_in_hint(provider: str, accounts: list[str], field: str) -> str:
    """What to do instead of ``gpupool auth`` on a pool that lists members' accounts."""
    return (f"this pool lists members' {provider} accounts ({', '.join(accounts)}): each member "
            f"runs `gpupool auth {provider}` on their own machine, with a pool file of their own "
            f"that lists no accounts, and the team's pool file points "
            f"providers.{provider}.accounts.<name>.{field} at the file it saved")


def team_of(cls: type[Provider], config: ProviderConfig, data_dir: Path,
            clock: Clock) -> TeamAccounts:
    """One ``cls`` adapter per account listed in ``config.accounts``, behind one ``TeamAccounts``."""
    listed: Mapping[str, AccountSection] = getattr(config, "accounts", {})
    members: dict[str, Provider] = {}
    for account, entry in listed.items():
        member = cls(account_config(config, entry), data_dir / "accounts" / account, clock)
        member.account_owner, member.account_notify = entry.owner, list(entry.notify)
        members[account] = member
    return team_class(cls)(members, config, data_dir, clock)
