"""Before an experiment is submitted: which of its providers can run it, and why each other
one is skipped, with the command or setting that fixes it.

``gpupool run`` prints this and refuses (exit 2) when none is usable, unless asked to wait:
an experiment accepted with nowhere to go would otherwise wait forever without a word.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpupool.errors import GpupoolError
from gpupool.pool import Pool
from gpupool.provider import Provider
from gpupool.spec import ExperimentSpec


@dataclass(frozen=True)
class ProviderCheck:
    """One provider's answer: usable or not, why, and what fixes it (a command or a setting)."""

    name: str
    usable: bool
    reason: str
    fix: str | None = None
    on_cpu: bool = False  # a GPU experiment that would train on this provider's CPU
    cpu_switch: str | None = None  # the setting that turns that off, when the adapter has one


def check_providers(pool: Pool, spec: ExperimentSpec) -> list[ProviderCheck]:
    """Check every provider in ``spec.providers``, in the experiment's order of preference.

    Credential checks may call the provider's API (Kaggle, Drive), each bounded by that
    provider's own request timeout."""
    return [check_provider(pool, spec, name) for name in spec.providers]


def check_provider(pool: Pool, spec: ExperimentSpec, name: str) -> ProviderCheck:
    where = _pool_file(pool)
    try:
        provider = pool.provider(name)
    except GpupoolError as err:
        return ProviderCheck(name, False, _first_line(str(err)), f"fix providers.{name} in {where}")
    if not provider.enabled:
        return ProviderCheck(name, False, "disabled in the pool configuration",
                             f"set providers.{name}.enabled: true in {where}")
    accounts = [a for a in provider.accounts() if spec.allows_account(name, a)]
    if not accounts:
        return ProviderCheck(name, False, f"the pool lists no account {', '.join(spec.accounts[name])}",
                             f"list it under providers.{name}.accounts in {where}, or change "
                             f"accounts.{name} in the experiment file")
    ok, reason = _check_accounts(provider, name, accounts)
    if not ok:
        return ProviderCheck(name, False, reason, _fix(provider, where))
    on_cpu = spec.resources.wants_gpu and provider.accepts_cpu()
    return ProviderCheck(name, True, reason, on_cpu=on_cpu, cpu_switch=_cpu_switch(provider))


def _cpu_switch(provider: Provider) -> str | None:
    """``providers.NAME.cpu_fallback`` when the adapter's settings have that key: the
    capability says an adapter may train on the CPU, not that a third party's config can
    turn it off."""
    has_key = "cpu_fallback" in type(provider.config).model_fields
    return f"providers.{provider.name}.cpu_fallback" if has_key else None


def _check_accounts(provider: Provider, name: str, accounts: list[str]) -> tuple[bool, str]:
    """Usable when one of the accounts the experiment may use is; each account is named when
    the pool lists members' accounts."""
    answers = []
    for account in accounts:
        try:
            ok, hint = provider.check_account(account)
        except GpupoolError as err:
            ok, hint = False, str(err)
        hint = _first_line(hint).removeprefix(f"{name}: ")  # the line already names the provider
        answers.append((ok, hint if accounts == ["default"] else f"{account}: {hint}"))
    return any(ok for ok, _ in answers), "; ".join(hint for _, hint in answers)


def _fix(provider: Provider, where: str) -> str:
    """What fixes unusable credentials, from what the adapter declares it can do."""
    name = provider.name
    if provider.capabilities.interactive_sign_in:  # `gpupool auth NAME` sets them up
        return f"gpupool auth {name}"
    switch = _cpu_switch(provider) if provider.capabilities.cpu_fallback else None
    if switch:
        return f"set {switch}: true in {where}, or install a CUDA GPU driver"
    return f"see `gpupool providers` and providers.{name} in {where}"


def _pool_file(pool: Pool) -> str:
    return str(pool.settings.config_file) if pool.settings.config_file else "the pool file"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def report_lines(checks: list[ProviderCheck]) -> list[str]:
    """The pre-flight report, one line per provider plus a line for each fix."""
    lines = []
    for check in checks:
        if check.usable:
            lines.append(f"  will use {check.name}: {check.reason}")
            if check.on_cpu:
                lines.append(f"    note: no GPU on {check.name}, so this GPU experiment will train "
                             "on the CPU there (much slower)" + (
                                 f"; set {check.cpu_switch}: false to wait for a GPU instead"
                                 if check.cpu_switch else ""))
        else:
            lines.append(f"  skipping {check.name}: {check.reason}")
            if check.fix:
                lines.append(f"    fix: {check.fix}")
    return lines


def usable(checks: list[ProviderCheck]) -> list[str]:
    return [check.name for check in checks if check.usable]
