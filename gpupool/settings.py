"""Pool configuration: where state and checkpoints live, and each provider's settings.

Read from ``$GPUPOOL_CONFIG`` or ``<user config dir>/gpupool/pool.yaml`` when present, then
overridden by ``GPUPOOL_*`` environment variables (nested with ``__``, e.g.
``GPUPOOL_PROVIDERS__KAGGLE__ENABLED=false``). Each provider validates its own section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gpupool.errors import SpecError
from gpupool.yamlfile import load_yaml_model

APP = "gpupool"


class _PoolFile(BaseModel):
    """The YAML file's shape, validated with line numbers before settings merge it."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path | None = None
    database_url: str | None = None
    store_url: str | None = None
    poll_interval: float = Field(10.0, gt=0)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)


class PoolSettings(BaseSettings):
    """The pool: state database, checkpoint store, polling, and raw provider sections."""

    model_config = SettingsConfigDict(env_prefix="GPUPOOL_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir(APP)))
    database_url: str | None = None
    store_url: str | None = None
    poll_interval: float = Field(10.0, gt=0)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
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
    """Settings from ``path`` (or the default location, if it exists) plus the environment."""
    explicit = path is not None
    config = Path(path) if path is not None else default_config_path()
    if not config.exists():
        if explicit or os.environ.get("GPUPOOL_CONFIG"):
            raise SpecError(str(config), [("file", "does not exist")])
        return PoolSettings()
    pool = load_yaml_model(config, _PoolFile)
    values = pool.model_dump(exclude_none=True)
    if pool.data_dir is not None:
        values["data_dir"] = (config.parent / pool.data_dir.expanduser()).resolve()
    return PoolSettings(**values, config_file=config)
