"""Save and load the full training state of a PyTorch run, so a resumed run continues exactly.

A session can end at any step; the next attempt, maybe on another provider, must pick up as if
nothing happened. That takes more than the weights: the optimizer's moments, the LR scheduler's
position, the grad scaler's scale and growth tracker, the step, and *every* random number generator
the loop draws from (dropout, data shuffling, augmentation) — Python's `random`, NumPy's global RNG,
torch's CPU and CUDA RNGs, and any generator objects the script owns (a DataLoader's
`torch.Generator`, a `numpy.random.Generator`, a `random.Random`).

The state is written as one file, ``state.pt``, that loads with ``torch.load(weights_only=True)``:
only tensors, containers and plain scalars, so restoring a checkpoint fetched from a shared store
never runs pickled code. Python's and NumPy's RNG states are converted to tensors and lists for that
reason.

Usage::

    from gpupool.torch import load_training_state, save_training_state

    state = load_training_state(restore_dir, model=model, optimizer=opt, lr_scheduler=sched,
                                generators={"loader": loader_gen})
    for step in range(state.step, total_steps):
        ...
        if time_to_checkpoint:
            save_training_state(out_dir, model=model, optimizer=opt, lr_scheduler=sched,
                                generators={"loader": loader_gen}, step=step + 1)

``step`` is whatever the script means by it; by convention the number of steps already done, so the
resumed loop starts at ``state.step``.

Importing this module imports torch; ``import gpupool`` does not import this module.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import threading
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Absolute import: this is the real PyTorch, not this module (gpupool.torch).
import torch

from gpupool.errors import CheckpointError, CorruptCheckpoint

try:  # NumPy is optional; without it there is no NumPy RNG to save.
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the supported environments
    np = None  # type: ignore[assignment]

__all__ = [
    "STATE_FILE",
    "PendingSave",
    "TrainingSnapshot",
    "TrainingState",
    "load_training_state",
    "save_training_state",
    "save_training_state_async",
    "snapshot_training_state",
]

STATE_FILE = "state.pt"
_FORMAT = "gpupool.training_state"
_VERSION = 1


def _corrupt(path: str, reason: str) -> CorruptCheckpoint:
    """The file can't be used at all: say so, and what to do about it."""
    return CorruptCheckpoint(path, f"{reason}; restore from an earlier verified checkpoint")


def _mismatch(path: str, reason: str) -> CheckpointError:
    """The file is fine but does not fit what the script asked to restore."""
    return CheckpointError(f"training state {path} does not match the script: {reason}")


class _Stateful(Protocol):
    """Anything with the state_dict protocol: optimizers, LR schedulers, grad scalers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class TrainingState:
    """What load_training_state hands back besides the objects it restored in place."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ saving


def save_training_state(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write the full training state into ``directory``; return the file names written (relative).

    ``generators`` maps names to ``torch.Generator``, ``numpy.random.Generator`` or
    ``random.Random`` objects the loop draws from; pass the same names to load_training_state.
    ``extra`` must be JSON-serialisable (checked here, so a bad value fails at save time, not at
    resume time).
    """
    payload = _collect_state(model, optimizer, lr_scheduler, grad_scaler, generators, step, extra)
    return _write_payload(directory, payload)


def snapshot_training_state(
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> TrainingSnapshot:
    """Copy the full training state into CPU memory now; write it later with ``.write(directory)``.

    The loop stalls only for the copy and may keep training (mutating model and optimizer) while the
    snapshot is written, e.g. ``session.checkpoint_in_background(step, snapshot.write)``.
    """
    payload = _collect_state(model, optimizer, lr_scheduler, grad_scaler, generators, step, extra)
    return TrainingSnapshot(step=int(step), _payload=_copy_to_cpu(payload))


@dataclass(frozen=True)
class TrainingSnapshot:
    """A training state held in CPU memory, independent of the live model and optimizer."""

    step: int
    _payload: dict[str, Any] = field(repr=False)

    def write(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the snapshot into ``directory`` like save_training_state; return file names."""
        return _write_payload(directory, self._payload)


def save_training_state_async(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> PendingSave:
    """Like save_training_state, but only the snapshot happens now; the file is written in a thread.

    Call ``.wait()`` on the handle before publishing the directory. Saves run in the order they were
    started, so an older state never replaces a newer one.
    """
    snapshot = snapshot_training_state(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        grad_scaler=grad_scaler,
        generators=generators,
        step=step,
        extra=extra,
    )
    return PendingSave(snapshot, directory)


class PendingSave:
    """A save running in a thread; ``wait()`` returns its file names or raises its error."""

    # The previous save's thread: each new save joins it first, so writes land in call order.
    _last_thread: threading.Thread | None = None
    _order_lock = threading.Lock()

    def __init__(self, snapshot: TrainingSnapshot, directory: str | os.PathLike[str]) -> None:
        self._files: list[str] | None = None
        self._error: BaseException | None = None
        with PendingSave._order_lock:
            previous = PendingSave._last_thread
            # Not a daemon: an interpreter exiting mid-write waits for the checkpoint to land.
            self._thread = threading.Thread(
                target=self._run, args=(snapshot, directory, previous), name="gpupool-save"
            )
            PendingSave._last_thread = self._thread
            self._thread.start()

    def _run(
        self,
        snapshot: TrainingSnapshot,
        directory: str | os.PathLike[str],
        previous: threading.Thread | None,
    ) -> None:
        if previous is not None:
            previous.join()
        try:
            self._files = snapshot.write(directory)
        except BaseException as exc:  # wait() re-raises it in the caller
            self._error = exc

    def done(self) -> bool:
        """Whether the write has finished (successfully or not)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> list[str]:
        """Block until the write finishes; return the file names, or raise what the write raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"training state save still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._files is not None
        return list(self._files)


def _collect_state(
    model: torch.nn.Module,
    optimizer: _Stateful | None,
    lr_scheduler: _Stateful | None,
    grad_scaler: _Stateful | None,
    generators: Mapping[str, Any] | None,
    step: int,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Gather everything into one plain payload (tensors are references, not copies)."""
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "step": int(step),
        # Stored as JSON text: validates JSON-ability now and keeps the pickle free of user objects.
        "extra": json.dumps(dict(extra or {})),
        "model": model.state_dict(),
        "optimizer": _state_dict_or_none(optimizer),
        "lr_scheduler": _state_dict_or_none(lr_scheduler),
        "grad_scaler": _state_dict_or_none(grad_scaler),
        "rng": _global_rng_state(),
        "generators": {name: _generator_state(gen) for name, gen in (generators or {}).items()},
    }


def _state_dict_or_none(obj: _Stateful | None) -> dict[str, Any] | None:
    return None if obj is None else obj.state_dict()


def _copy_to_cpu(obj: Any) -> Any:
    """Deep-copy a payload with every tensor cloned into CPU memory, keeping state-dict metadata."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        copied.update((key, _copy_to_cpu(value)) for key, value in obj.items())
        # Module state dicts carry per-module versions here; load_state_dict uses them to migrate.
        if hasattr(obj, "_metadata"):
            copied._metadata = _copy_to_cpu(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if type(obj) in (list, tuple):  # exact types: a namedtuple can't be rebuilt from one iterable
        return type(obj)(_copy_to_cpu(item) for item in obj)
    return obj


def _write_payload(directory: str | os.PathLike[str], payload: dict[str, Any]) -> list[str]:
    """Write atomically: a temp file in the same directory, fsynced, then renamed over STATE_FILE.

    A reader (or a session killed mid-save) sees either the old file or the complete new one.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # A unique name (not mkstemp, which makes files 0600): the file gets the umask's permissions.
    tmp_path = os.path.join(directory, f".{STATE_FILE}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp_path, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, os.path.join(directory, STATE_FILE))
    except BaseException:
        _remove_quietly(tmp_path)
        raise
    _fsync_directory(directory)
    return [STATE_FILE]


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable; POSIX only (Windows can't open a directory for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------- RNGs


def _global_rng_state() -> dict[str, Any]:
    """The process-wide RNGs, each as weights_only-safe values (tensors, lists, scalars)."""
    state: dict[str, Any] = {
        "python": _python_random_state(random.getstate()),
        "torch_cpu": torch.get_rng_state(),
        "numpy": None,
        "cuda": None,
    }
    if np is not None:
        legacy = np.random.get_state(legacy=True)  # the tuple form np.random.set_state takes back
        assert isinstance(legacy, tuple)
        state["numpy"] = _numpy_legacy_state(legacy)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_random_tuple(state["python"]))
    torch.set_rng_state(state["torch_cpu"].cpu())
    if np is not None and state["numpy"] is not None:
        np.random.set_state(_numpy_legacy_tuple(state["numpy"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        _set_cuda_rng_states(state["cuda"])


def _set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore as many devices as both machines have: a later session may have more or fewer."""
    for index in range(min(len(states), torch.cuda.device_count())):
        torch.cuda.set_rng_state(states[index].cpu(), index)


def _python_random_state(state: tuple[Any, ...]) -> dict[str, Any]:
    """random.getstate() is (version, 625 ints < 2**32, gauss_next); the ints become a tensor."""
    version, internal, gauss_next = state
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _python_random_tuple(state: dict[str, Any]) -> tuple[Any, ...]:
    internal = tuple(int(value) for value in state["internal"].tolist())
    return (state["version"], internal, state["gauss_next"])


def _numpy_legacy_state(state: tuple[Any, ...]) -> dict[str, Any]:
    """np.random.get_state() is ('MT19937', uint32 keys, pos, has_gauss, cached_gaussian)."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_legacy_tuple(state: dict[str, Any]) -> tuple[Any, ...]:
    keys = state["keys"].numpy().astype(np.uint32)
    return (
        state["bit_generator"],
        keys,
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def _generator_state(gen: Any) -> dict[str, Any]:
    """One script-owned generator's state, tagged with its kind so loading can check it matches."""
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "state": gen.get_state()}
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": _python_random_state(gen.getstate())}
    if np is not None and isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": _plain_numpy(gen.bit_generator.state)}
    raise TypeError(
        f"cannot save generator of type {type(gen).__name__}; "
        "pass torch.Generator, numpy.random.Generator or random.Random"
    )


def _set_generator_state(name: str, gen: Any, saved: dict[str, Any], path: str) -> None:
    kind = _generator_state(gen)["kind"]  # also rejects unsupported types, like saving does
    if saved["kind"] != kind:
        raise _mismatch(path, f"generator {name!r} was saved as {saved['kind']}, not {kind}")
    if kind == "torch":
        gen.set_state(saved["state"].cpu())
    elif kind == "python":
        gen.setstate(_python_random_tuple(saved["state"]))
    else:
        # NumPy's bit-generator state setters accept lists where they produced arrays.
        gen.bit_generator.state = saved["state"]


def _plain_numpy(obj: Any) -> Any:
    """A NumPy bit-generator state with arrays as lists and NumPy scalars as Python ones."""
    if isinstance(obj, dict):
        return {key: _plain_numpy(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------------- loading


def load_training_state(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> TrainingState:
    """Restore in place everything save_training_state wrote into ``directory``; return step, extra.

    Build the model, optimizer, scheduler and scaler as for a fresh run, then call this. Every RNG
    is restored last, so nothing done while loading draws from them. Raises CorruptCheckpoint when
    the file is missing, unreadable or not a gpupool training state, and CheckpointError when it
    lacks a component or generator passed here.
    """
    path = os.path.join(os.fspath(directory), STATE_FILE)
    payload = _read_payload(path, map_location)
    model.load_state_dict(payload["model"])
    _load_component(path, payload, "optimizer", optimizer)
    _load_component(path, payload, "lr_scheduler", lr_scheduler)
    _load_component(path, payload, "grad_scaler", grad_scaler)
    _load_generators(path, payload["generators"], generators or {})
    _set_global_rng_state(payload["rng"])
    return TrainingState(step=payload["step"], extra=json.loads(payload["extra"]))


def _read_payload(path: str, map_location: str | torch.device | None) -> dict[str, Any]:
    """torch.load with weights_only=True; every way a file can be bad becomes one clear error."""
    if not os.path.isfile(path):
        raise _corrupt(path, f"no {STATE_FILE} in it")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        OSError,
    ) as exc:
        raise _corrupt(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise _corrupt(path, "not a gpupool training state")
    if payload.get("version") != _VERSION:
        raise _mismatch(
            path, f"format version {payload.get('version')!r} is not {_VERSION}; upgrade gpupool"
        )
    return payload


def _load_component(path: str, payload: dict[str, Any], key: str, target: _Stateful | None) -> None:
    if target is None:
        return
    if payload[key] is None:
        raise _mismatch(path, f"no {key} state was saved, but one was passed to load into")
    target.load_state_dict(payload[key])


def _load_generators(path: str, saved: dict[str, Any], generators: Mapping[str, Any]) -> None:
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise _mismatch(path, f"no state saved for generator(s) {missing}")
    for name, gen in generators.items():
        _set_generator_state(name, gen, saved[name], path)
