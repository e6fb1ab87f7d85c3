"""Pool configuration: where state and checkpoints live, and each provider's settings.

Read from ``$GPUPOOL_CONFIG`` or ``<user config dir>/gpupool/pool.yaml`` when present, then
overridden by ``GPUPOOL_*`` environment variables (nested with ``__``, e.g.
``GPUPOOL_PROVIDERS__KAGGLE__ENABLED=false``). Everything is checked when loaded, each
provider's section against that provider's own model, and every problem is reported at once
with its line (or the environment variable it came from) and the key it was probably meant to be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gpupool.durations import Seconds
from gpupool.errors import GpupoolError, SpecError
from gpupool.yamlfile import compose, did_you_mean, load_yaml_model, locate_in, validation_problems

APP = "gpupool"


class _PoolFile(BaseModel):
    """The YAML file's shape, validated with line numbers before settings merge it."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path | None = None
    database_url: str | None = None
    store_url: str | None = None
    poll_interval: Seconds = Field(10.0, gt=0)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    notify: list[str] = Field(default_factory=list, description="apprise URLs (gpupool.notify)")

    @field_validator("data_dir")
    @classmethod
    def _no_nul(cls, value: Path | None) -> Path | None:
        if value is not None and "\x00" in str(value):
            raise ValueError("a path cannot hold a NUL character")
        return value


class PoolSettings(BaseSettings):
    """The pool: state database, checkpoint store, polling, and raw provider sections."""

    model_config = SettingsConfigDict(env_prefix="GPUPOOL_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir(APP)))
    database_url: str | None = None
    store_url: str | None = None
    poll_interval: Seconds = Field(10.0, gt=0, description="seconds between scheduler steps")
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    notify: list[str] = Field(default_factory=list, description="apprise URLs (gpupool.notify)")
    config_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'state.db'}"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or str(self.data_dir / "checkpoints")

    def provider_section(self, name: str) -> dict[str, Any]:
        return dict(self.providers.get(name, {}))


def default_config_path() -> Path:
    return Path(os.environ.get("GPUPOOL_CONFIG") or Path(platformdirs.user_config_dir(APP)) / "pool.yaml")


def load_settings(path: str | Path | None = None) -> PoolSettings:
    """Settings from ``path`` (or the default location, if it exists) plus the environment.

    Raises ``SpecError`` (exit 2) naming every bad key, value or environment variable."""
    explicit = path is not None
    config = Path(path) if path is not None else default_config_path()
    if not config.exists():
        if explicit or os.environ.get("GPUPOOL_CONFIG"):
            raise SpecError(str(config), [("file", "does not exist")])
        settings = _settings({}, None, None)
        check_provider_sections(settings, None)
        return settings
    pool = load_yaml_model(config, _PoolFile)
    values = pool.model_dump(exclude_none=True)
    if pool.data_dir is not None:
        values["data_dir"] = (config.parent / pool.data_dir.expanduser()).resolve()
    root = compose(config.read_text(encoding="utf-8"))
    settings = _settings(values, config, root)
    check_provider_sections(settings, root)
    check_notify_urls(settings, root)
    return settings


def _settings(values: dict[str, Any], config: Path | None, root: yaml.Node | None) -> PoolSettings:
    """PoolSettings from the file's values and the environment; a bad value in either is a
    ``SpecError`` naming the variable (or the file's line), never a traceback."""
    try:
        return PoolSettings(**values, config_file=config)
    except ValidationError as err:
        raise SpecError(_source(config), _settings_problems(err, root)) from None


def _source(config: Path | None) -> str:
    return str(config) if config else "pool configuration (GPUPOOL_* environment)"


def _settings_problems(err: ValidationError, root: yaml.Node | None) -> list[tuple[str, str]]:
    problems = []
    for (where, what), item in zip(validation_problems(err, root, PoolSettings), err.errors(), strict=True):
        variable = env_variable(tuple(item["loc"]))
        if variable in os.environ:
            where = f"{variable}={os.environ[variable]!r}"
        problems.append((where, what))
    return problems


def env_variable(loc: tuple[Any, ...]) -> str:
    """The environment variable that sets the value at ``loc`` (``GPUPOOL_PROVIDERS__KAGGLE__X``)."""
    return "GPUPOOL_" + "__".join(str(part).upper() for part in loc)


def check_provider_sections(settings: PoolSettings, root: yaml.Node | None) -> None:
    """Validate each ``providers.<name>`` section with its provider's own model, so a misspelt
    key or a bad value stops the command here instead of the provider being skipped later."""
    from gpupool.provider import available_providers, load_provider_class

    installed = sorted(available_providers())
    problems: list[tuple[str, str]] = []
    normalized: dict[str, dict[str, Any]] = {}
    for name, section in settings.providers.items():
        where = locate_in(root, ("providers", name), key=True)
        if name not in installed:
            hint = did_you_mean(name, installed) or f" (installed: {', '.join(installed) or 'none'})"
            problems.append((where, f"unknown provider{hint}"))
            continue
        try:
            model = load_provider_class(name).Config
            checked = model.model_validate(section)
        except GpupoolError as err:
            problems.append((where, str(err)))
        except ValidationError as err:
            problems += _section_problems(err, root, model, name)
        else:  # the keys as given, with values in their checked form ("30m" becomes 1800.0)
            normalized[name] = checked.model_dump(mode="json", include=set(section))
    if problems:
        raise SpecError(_source(settings.config_file), problems)
    settings.providers = normalized


def _section_problems(err: ValidationError, root: yaml.Node | None, model: type[BaseModel],
                      name: str) -> list[tuple[str, str]]:
    prefix = ("providers", name)
    problems = []
    for (where, what), item in zip(validation_problems(err, root, model, prefix), err.errors(), strict=True):
        variable = env_variable(prefix + tuple(item["loc"]))
        if variable in os.environ:
            where = f"{variable}={os.environ[variable]!r}"
        problems.append((where, what))
    return problems


def check_notify_urls(settings: PoolSettings, root: yaml.Node | None) -> None:
    """Each ``notify`` entry must be a URL apprise can send to; the URL itself is never shown
    (it usually carries a token or a password)."""
    if not settings.notify:
        return
    from gpupool.notify import invalid_urls

    problems = [(locate_in(root, ("notify", index)),
                 "not a notification URL apprise knows (e.g. ntfy://topic, tgram://bot/chat, "
                 "mailto://user:pass@host; see the apprise wiki)")
                for index in invalid_urls(settings.notify)]
    if problems:
        raise SpecError(_source(settings.config_file), problems)
