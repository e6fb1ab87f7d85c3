"""Save and load the full training state of a PyTorch run, so a resumed run continues exactly.

A session can end at any step; the next attempt, maybe on another provider, must pick up as if
nothing happened. That takes more than the weights: the optimizer's moments, the LR scheduler's
position, the grad scaler's scale and growth tracker, the step, the data loader's position inside
its epoch, any other model the loop keeps (an EMA copy), and *every* random number generator the
loop draws from (dropout, data shuffling, augmentation) — Python's `random`, NumPy's global RNG,
torch's CPU and CUDA RNGs, and any generator objects the script owns (a `torch.Generator`, a
`numpy.random.Generator`, a `random.Random`).

The state is written as one file, ``state.pt``, that loads with ``torch.load(weights_only=True)``:
only tensors, containers and plain scalars, so restoring a checkpoint fetched from a shared store
never runs pickled code. NumPy values in a state dict are encoded (and decoded on load), and
anything else a weights-only load would refuse is refused at save time, naming its key: a
checkpoint that saved is a checkpoint that loads. Each new file is also checked against torch's
weights-only allow-list before it replaces the previous one.

Usage::

    from torchdata.stateful_dataloader import StatefulDataLoader   # resumes mid-epoch
    from gpupool.torch import load_training_state, save_training_state

    loader = StatefulDataLoader(dataset, batch_size=32, shuffle=True, num_workers=2)
    parts = dict(model=model, optimizer=opt, lr_scheduler=sched, loaders={"train": loader},
                 modules={"ema": ema_model})
    state = load_training_state(restore_dir, **parts)
    ...
    save_training_state(out_dir, step=step, **parts)

``step`` is whatever the script means by it; by convention the number of steps already done, so the
resumed loop starts at ``state.step``.

Importing this package imports torch; ``import gpupool`` does not import it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Absolute import: this is the real PyTorch, not this package (gpupool.torch).
import torch

from gpupool.errors import CheckpointError
from gpupool.torch import _components, _file

__all__ = [
    "STATE_FILE",
    "TrainingSnapshot",
    "TrainingState",
    "load_training_state",
    "save_training_state",
    "snapshot_training_state",
]

STATE_FILE = "state.pt"


class _Stateful(Protocol):
    """Anything with the state_dict protocol: optimizers, LR schedulers, grad scalers, loaders."""

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
    loaders: Mapping[str, _Stateful] | None = None,
    modules: Mapping[str, _Stateful] | None = None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write the full training state into ``directory``; return the file names written (relative).

    ``generators`` maps names to ``torch.Generator``, ``numpy.random.Generator`` or
    ``random.Random`` objects the loop draws from. ``loaders`` maps names to data loaders that
    can save their position inside an epoch (torchdata's ``StatefulDataLoader``); their
    generators are saved with them. ``modules`` maps names to any other object with
    ``state_dict``/``load_state_dict`` (an EMA model, a second optimizer). ``extra`` holds JSON
    values (NumPy scalars become Python numbers). Pass the same names to load_training_state.

    Raises CheckpointError, naming the key, for anything that could not be loaded back (a plain
    DataLoader, an object without a state dict, a value ``torch.load(weights_only=True)``
    refuses); nothing is left out silently, and nothing is written then. OSError if the
    directory can't be written.
    """
    parts = _parts(model, optimizer, lr_scheduler, grad_scaler, generators, loaders, modules)
    return _write_payload(directory, _components.collect(parts, step, extra))


def snapshot_training_state(
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    loaders: Mapping[str, _Stateful] | None = None,
    modules: Mapping[str, _Stateful] | None = None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> TrainingSnapshot:
    """Copy the full training state into CPU memory now; write it later with ``.write(directory)``.

    The loop stalls only for the copy and may keep training (mutating model and optimizer) while the
    snapshot is written, e.g. ``session.checkpoint_in_background(step, snapshot.write)``. Raises
    CheckpointError now, like save_training_state, for anything that cannot be saved.
    """
    parts = _parts(model, optimizer, lr_scheduler, grad_scaler, generators, loaders, modules)
    return _snapshot(parts, step, extra)


PART_NAMES = ("model", "optimizer", "lr_scheduler", "grad_scaler", "generators", "loaders", "modules")


def _parts(*objects: Any) -> dict[str, Any]:
    """The objects the three public functions take, by keyword name (in ``PART_NAMES`` order)."""
    return dict(zip(PART_NAMES, objects, strict=True))


def _snapshot(parts: dict[str, Any], step: int, extra: Mapping[str, Any] | None) -> TrainingSnapshot:
    payload = _components.collect(parts, step, extra)
    return TrainingSnapshot(step=int(step), _payload=_copy_to_cpu(payload))


@dataclass(frozen=True)
class TrainingSnapshot:
    """A training state held in CPU memory, independent of the live model and optimizer."""

    step: int
    _payload: dict[str, Any] = field(repr=False)

    def write(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the snapshot into ``directory`` like save_training_state; return file names."""
        return _write_payload(directory, self._payload)


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
    """Write atomically, only once the file is known to load; a reader (or a session killed
    mid-save) sees either the old file or the complete new one."""
    _file.write_verified(os.fspath(directory), STATE_FILE, payload)
    return [STATE_FILE]


# ----------------------------------------------------------------------------------- loading


def load_training_state(
    directory: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: _Stateful | None = None,
    lr_scheduler: _Stateful | None = None,
    grad_scaler: _Stateful | None = None,
    generators: Mapping[str, Any] | None = None,
    loaders: Mapping[str, _Stateful] | None = None,
    modules: Mapping[str, _Stateful] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> TrainingState:
    """Restore in place everything save_training_state wrote into ``directory``; return step, extra.

    Build the model, optimizer, scheduler, scaler, loaders and modules as for a fresh run, then
    call this. Data loaders resume at their saved position; every RNG is restored last, so nothing
    done while loading draws from them. ``map_location`` as for torch.load; with None, tensors
    saved on a device this machine lacks (a GPU state in a CPU session) load onto the CPU.

    Raises CorruptCheckpoint when the file's bytes are damaged (use an earlier checkpoint), and
    CheckpointError, naming the key and the fix, for everything else: no state.pt, a file not
    written by save_training_state, values a weights-only load refuses, a ``map_location`` this
    machine lacks, a part or generator passed here that was not saved, a state that does not fit
    its object.
    """
    parts = _parts(model, optimizer, lr_scheduler, grad_scaler, generators, loaders, modules)
    path = os.path.join(os.fspath(directory), STATE_FILE)
    payload = _file.read_payload(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != _components.FORMAT:
        raise CheckpointError(
            f"training state {path} is a torch file but not a gpupool training state (written by "
            "something else, e.g. torch.save); write it with gpupool.torch.save_training_state"
        )
    if payload.get("version") not in _components.READABLE_VERSIONS:
        version = payload.get("version")
        raise _mismatch(path, f"format version {version!r} is newer than this gpupool reads; upgrade gpupool")
    _components.apply(payload, parts, lambda reason: _mismatch(path, reason))
    return TrainingState(step=payload["step"], extra=json.loads(payload["extra"]))


def _mismatch(path: str, reason: str) -> CheckpointError:
    """The file is fine but does not fit what the script asked to restore."""
    return CheckpointError(f"training state {path} does not match the script: {reason}")
