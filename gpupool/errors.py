"""Every error gpupool raises on purpose.

    GpupoolError                      root: a message that says what, where and what to do next
    ├── SpecError                     an experiment or pool file is invalid (carries every problem)
    ├── ConfigError                   pool configuration or environment is unusable
    ├── StateError                    the state database cannot be used
    │   ├── IllegalTransition         a state change the lifecycle does not allow
    │   └── StoredSpecError           a stored experiment file no longer validates (other version)
    ├── NotFound                      no experiment / attempt with that id
    ├── CheckpointError               the checkpoint store refused or failed
    │   ├── CorruptCheckpoint         a checkpoint's files do not match its manifest
    │   ├── UnsafePath                a manifest names a path outside its checkpoint
    │   ├── StoreUnreachable          the store could not be read (network, I/O): ask again later
    │   └── ManifestError             a manifest is malformed or unsafe, or a local checkpoint
    │                                 folder does not match it (raised by gpupool.manifest)
    ├── ProviderError                 a provider failed (network, protocol, remote error)
    │   ├── CredentialsError          credentials missing, invalid, expired or revoked
    │   ├── ProviderUnavailable       no capacity now: the scheduler should try elsewhere
    │   ├── CancelFailed              a session could not be stopped; the person must act
    │   ├── InputUnavailable          an experiment's input is gone or wrong: the attempt fails
    │   ├── RemoteNotFound            the service has no such object (Drive 404, Kaggle 403/404)
    │   └── RateLimited               the service asked us to slow down (``retry_after``)
    └── RuntimeErrorInSession         misuse of gpupool.runtime inside a training script
"""

from __future__ import annotations


class GpupoolError(Exception):
    """Root of gpupool's errors; ``str(err)`` is meant for the user."""

    exit_code = 1


class SpecError(GpupoolError):
    """An input file failed validation; ``problems`` lists ``(location, message)`` pairs."""

    exit_code = 2

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {where}: {what}" for where, what in problems]
        super().__init__("\n".join(lines))


class ConfigError(GpupoolError):
    exit_code = 2


class StateError(GpupoolError):
    pass


class IllegalTransition(StateError):
    def __init__(self, kind: str, ident: str, current: str, target: str):
        self.kind, self.ident, self.current, self.target = kind, ident, current, target
        super().__init__(f"{kind} {ident}: cannot move from {current} to {target}")


class StoredSpecError(StateError):
    """An experiment's stored spec does not validate under this gpupool (written by an older
    or newer version); the scheduler fails that experiment alone."""


class NotFound(GpupoolError):
    exit_code = 3


class CheckpointError(GpupoolError):
    pass


class CorruptCheckpoint(CheckpointError):
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"checkpoint {name} is corrupt: {reason}")


class UnsafePath(CheckpointError):
    pass


class StoreUnreachable(CheckpointError):
    """The store could not be read (Drive or S3 unreachable once its client's retries are
    spent, an I/O error): nothing is known about its checkpoints, so nothing may be decided
    from it (not "corrupt", not "absent"); the scheduler records it and asks again."""


class ManifestError(CheckpointError):
    """A manifest is malformed or names an unsafe path, or a local checkpoint folder does not
    match its manifest (``gpupool.manifest``, which runs inside sessions, raises it; this
    module is shipped with it)."""


class ProviderError(GpupoolError):
    def __init__(self, provider: str, message: str):
        self.provider = provider
        prefix = f"{provider}: "
        while message.startswith(prefix):  # wrapping another error of the same provider
            message = message[len(prefix):]
        super().__init__(prefix + message)


class CredentialsError(ProviderError):
    pass


class ProviderUnavailable(ProviderError):
    """No capacity now. ``until`` (epoch seconds) says when to try again, if known."""

    def __init__(self, provider: str, message: str, until: float | None = None):
        self.until = until
        super().__init__(provider, message)


class CancelFailed(ProviderError):
    """A running session could not be stopped (no API to stop it, or the call failed).

    ``action`` says what the person must do (e.g. stop it on kaggle.com); gpupool keeps
    tracking and charging that session until it ends."""

    def __init__(self, provider: str, message: str, action: str = ""):
        self.action = action
        super().__init__(provider, message + (f"; {action}" if action else ""))


class InputUnavailable(ProviderError):
    """An input cannot be brought into the session (deleted dataset, wrong sha256, unreadable
    file). Retrying, here or elsewhere, cannot help, so the scheduler fails the attempt and the
    experiment with this reason (no retries)."""


class RemoteNotFound(ProviderError):
    """The service has no object with that id or name: Drive answered 404, Kaggle 403/404 (a
    kernel or dataset that does not exist, or is not ours). Mapped where the answer enters
    gpupool, so it is never mistaken for a missing local file; a delete treats it as done."""


class RateLimited(ProviderError):
    def __init__(self, provider: str, message: str, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(provider, message)


class RuntimeErrorInSession(GpupoolError):
    pass
