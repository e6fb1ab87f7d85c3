"""The pool: settings, state database, checkpoint store and providers, opened together."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gpupool.bundle import pack_workdir
from gpupool.clock import SYSTEM_CLOCK, Clock, as_clock
from gpupool.errors import ConfigError, SpecError
from gpupool.inputs import InputSources, input_problems, raise_problems
from gpupool.manifest import Manifest
from gpupool.provider import Provider, available_providers, load_provider_class
from gpupool.settings import PoolSettings
from gpupool.spec import ExperimentSpec
from gpupool.state import Experiment, State
from gpupool.store import CheckpointStore


class Pool:
    """One user's (or team's) pool. ``clock`` (``gpupool.clock``) is the time everything the
    pool opens reads and sleeps on: the scheduler, the providers, the library face. Tests pass
    a ``ManualClock``, or a function of epoch seconds (wall time only; sleeps stay real)."""

    def __init__(self, settings: PoolSettings, *, clock: Clock | Callable[[], float] = SYSTEM_CLOCK,
                 providers: dict[str, Provider] | None = None):
        self.settings = settings
        self.clock = as_clock(clock)
        self.data_dir = Path(settings.data_dir)
        self.state = State(settings.resolved_database_url)
        self.store_root = CheckpointStore(settings.resolved_store_url)
        self.sources = InputSources(self.data_dir / "inputs", self.source_owner)
        self._providers: dict[str, Provider] = {}
        for name, provider in (providers or {}).items():
            self._adopt(name, provider)

    def _adopt(self, name: str, provider: Provider) -> None:
        """Keep ``provider``, able to ask other adapters for inputs they download."""
        for adapter in [provider, *getattr(provider, "members", {}).values()]:
            adapter.sources = self.sources
        self._providers[name] = provider

    def close(self) -> None:
        self.state.close()

    # -- providers ------------------------------------------------------------------------

    def provider_names(self) -> list[str]:
        """Every provider installed or configured (configured ones may be disabled)."""
        return sorted(set(available_providers()) | set(self.settings.providers) | set(self._providers))

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            cls = load_provider_class(name)
            section = self.settings.provider_section(name)
            self._adopt(name, cls.from_section(section, self.data_dir / name, self.clock))
        return self._providers[name]

    def source_owner(self, kind: str) -> Provider | None:
        """The adapter that downloads inputs of ``kind`` for other providers (its class lists
        the kind in ``input_sources``), None when none is installed and configured."""
        for name in self.provider_names():
            try:
                owns = kind in load_provider_class(name).input_sources
            except ConfigError:
                continue
            if owns:
                return self.try_provider(name)
        return None

    def opened_providers(self) -> list[Provider]:
        """The providers built so far (each is built on its first use)."""
        return list(self._providers.values())

    def try_provider(self, name: str) -> Provider | None:
        """The provider, or None if it is not installed / not configured properly."""
        try:
            return self.provider(name)
        except (ConfigError, SpecError):
            return None

    # -- experiments ----------------------------------------------------------------------

    def store_for(self, experiment_id: str) -> CheckpointStore:
        store = self.store_root.child(experiment_id)
        store.on_corrupt = lambda what, why: self._record_corrupt(experiment_id, what, why)
        return store

    def _record_corrupt(self, experiment_id: str, what: Manifest | str, why: str) -> None:
        name = what.name if isinstance(what, Manifest) else what
        self.state.add_event(self.clock(), experiment_id, None, "corrupt-checkpoint",
                             f"checkpoint {name} skipped: {why}")

    def submit(self, spec: ExperimentSpec, source: Path | None = None) -> Experiment:
        """Record a new experiment with a snapshot of its code; the scheduler places it.

        Raises SpecError (exit 2, with lines from ``source``, the experiment file) when an
        input cannot be brought to one of its providers."""
        for name in spec.providers:
            load_provider_class(name)  # unknown provider names fail here, not at placement
        self.check_inputs(spec, source)
        self.store_root.check_writable()
        now = self.clock()
        bundle_dir = self.data_dir / "bundles"
        staging = bundle_dir / f"{spec.name}-{int(now * 1000)}.tar.gz"
        pack_workdir(spec.workdir, staging, exclude=spec.state_folders())
        spec_data = json.loads(spec.model_dump_json())
        experiment = self.state.create_experiment(spec.name, spec_data, str(staging), now)
        return experiment

    def check_inputs(self, spec: ExperimentSpec, source: Path | None = None) -> None:
        """Every input against this machine and every configured provider the spec lists."""
        problems = input_problems(spec)
        if not problems:
            checked: set[str] = set()
            for name in spec.providers:
                provider = self.try_provider(name)
                if provider is not None and provider.enabled:
                    problems += provider.check_inputs(spec)
                    checked.add(name)
            problems += self.sources.check(spec, checked)
        raise_problems(list(dict.fromkeys(problems)), source)
