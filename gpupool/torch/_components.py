"""Gather the training state's parts into one payload, and put a loaded payload back into objects.

Every part is checked when it is gathered, so whatever cannot be saved is refused at save time,
naming its key: an object without ``state_dict``/``load_state_dict``, a plain DataLoader (it has no
position to save), ``extra`` that is not JSON, a value a weights-only load refuses.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gpupool.errors import CheckpointError
from gpupool.torch._loadable import make_loadable, refuse, restore_numpy
from gpupool.torch._rng import generator_state, global_rng_state, set_generator_state, set_global_rng_state

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the supported environments
    np = None  # type: ignore[assignment]

FORMAT = "gpupool.training_state"
VERSION = 2  # 2: modules, loaders, NumPy values encoded, generators record their device
READABLE_VERSIONS = (1, 2)
SINGLE_PARTS = ("model", "optimizer", "lr_scheduler", "grad_scaler")


def collect(parts: Mapping[str, Any], step: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """One plain payload from the objects passed to save_training_state (tensors are references).

    ``parts`` holds model, optimizer, lr_scheduler, grad_scaler (objects or None), and generators,
    loaders, modules (mappings of names to objects, or None).
    """
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": int(step)}
    # Stored as JSON text: the pickle holds no user objects, and it reads back as it was written.
    payload["extra"] = json.dumps(_plain_json(dict(extra or {}), "extra"))
    for key in SINGLE_PARTS:
        obj = parts.get(key)
        payload[key] = None if obj is None else _state_of(obj, key)
    payload["modules"] = {
        name: _state_of(obj, f"modules[{name!r}]") for name, obj in _named(parts, "modules").items()
    }
    payload["loaders"] = {
        name: _loader_state(obj, f"loaders[{name!r}]") for name, obj in _named(parts, "loaders").items()
    }
    payload["generators"] = {
        name: generator_state(gen, f"generators[{name!r}]")
        for name, gen in _named(parts, "generators").items()
    }
    payload["rng"] = global_rng_state()
    return payload


def apply(payload: dict[str, Any], parts: Mapping[str, Any], mismatch: Callable[[str], Exception]) -> None:
    """Restore everything in ``parts`` from ``payload``; ``mismatch(reason)`` builds the error.

    Order matters: data loaders are rebuilt at their saved position first (which draws from their
    generators), then generators and finally the global RNGs are set, so every RNG ends as saved.
    """
    for key in SINGLE_PARTS:
        target = parts.get(key)
        if target is not None:
            if payload[key] is None:
                raise mismatch(f"no {key} state was saved, but one was passed to load into")
            _load_into(target, payload[key], key, mismatch)
    for group, loader in (("modules", _load_into), ("loaders", _load_loader)):
        saved = payload.get(group, {})
        for name, target in _named(parts, group).items():
            where = f"{group}[{name!r}]"
            if name not in saved:
                raise mismatch(f"no state was saved for {where} (saved: {sorted(saved)})")
            loader(target, saved[name], where, mismatch)
    saved_generators = payload["generators"]
    for name, gen in _named(parts, "generators").items():
        where = f"generators[{name!r}]"
        if name not in saved_generators:
            raise mismatch(f"no state was saved for {where} (saved: {sorted(saved_generators)})")
        set_generator_state(gen, saved_generators[name], where, mismatch)
    set_global_rng_state(payload["rng"])
    _warn_if_left_out(payload, parts)


def _warn_if_left_out(payload: dict[str, Any], parts: Mapping[str, Any]) -> None:
    """Saved parts the script did not pass are not restored: fine for evaluating a model, but an
    EMA model or a loader forgotten here would silently start over, so say which."""
    left = [key for key in SINGLE_PARTS if payload[key] is not None and parts.get(key) is None]
    for group in ("modules", "loaders", "generators"):
        passed = _named(parts, group)
        left += [f"{group}[{name!r}]" for name in payload.get(group, {}) if name not in passed]
    if left:
        warnings.warn(
            f"the training state also holds {', '.join(left)}, not passed to load_training_state, "
            "so not restored; pass them as when saving to resume them",
            RuntimeWarning,
            stacklevel=4,  # the script's load_training_state call
        )


def _named(parts: Mapping[str, Any], group: str) -> Mapping[str, Any]:
    named = parts.get(group) or {}
    if not isinstance(named, Mapping):
        raise CheckpointError(
            f"{group}= must map names to objects, e.g. {group}={{'train': obj}}, not a {type(named).__name__}"
        )
    return named


def _state_of(obj: Any, where: str) -> Any:
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise CheckpointError(
            f"cannot save the training state: {where} is a {type(obj).__name__}, which has no "
            "state_dict()/load_state_dict(); pass modules, optimizers, schedulers and scalers, "
            "put plain values in extra=, and generators in generators="
        )
    return make_loadable(obj.state_dict(), where)


def _loader_state(loader: Any, where: str) -> dict[str, Any]:
    """A stateful data loader's position in its epoch, and its generator's state *now*."""
    if isinstance(loader, torch.utils.data.DataLoader) and not hasattr(loader, "load_state_dict"):
        raise CheckpointError(
            f"cannot save the training state: {where} is a torch.utils.data.DataLoader, which cannot "
            "save its position in the epoch, so a resumed run would see some samples twice and "
            "others never; build it as torchdata.stateful_dataloader.StatefulDataLoader (same "
            "arguments)"
        )
    generator = getattr(loader, "generator", None)
    return {
        "state": _state_of(loader, where),
        "generator": generator_state(generator, f"{where}.generator")
        if isinstance(generator, torch.Generator)
        else None,
    }


def _load_into(target: Any, state: Any, where: str, mismatch: Callable[[str], Exception]) -> None:
    try:
        target.load_state_dict(restore_numpy(state))
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise mismatch(
            f"{where} does not fit the {type(target).__name__} passed to load it into "
            f"({type(exc).__name__}: {exc}); build it as the run that saved it did (same "
            "architecture, parameter groups and arguments)"
        ) from exc


def _load_loader(
    loader: Any, saved: dict[str, Any], where: str, mismatch: Callable[[str], Exception]
) -> None:
    _load_into(loader, saved["state"], where, mismatch)
    # torchdata applies a loaded state lazily, when the next iterator is made, and making it draws
    # from the loader's generator; and its sampler rewinds that generator to the epoch's start
    # (losing the draw of the workers' base seed). So make the iterator now (state_dict() does, and
    # the next iter() reuses it), then set the generator to exactly what it was at save time.
    try:
        loader.state_dict()
    except (AssertionError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # torchdata asserts on a state from a loader with another num_workers (0 vs. more).
        raise mismatch(
            f"{where} was saved by a data loader built differently ({type(exc).__name__}: {exc}); "
            "build it as the run that saved it did: the same dataset, batch_size, sampler and "
            "num_workers (a fixed number, not one derived from the machine's CPU count)"
        ) from exc
    generator = getattr(loader, "generator", None)
    if saved["generator"] is not None and isinstance(generator, torch.Generator):
        set_generator_state(generator, saved["generator"], f"{where}.generator", mismatch)


def _plain_json(value: Any, where: str) -> Any:
    """``extra`` as JSON values: NumPy scalars become Python numbers; anything else is refused."""
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _plain_json(item, f"{where}[{key!r}]") for key, item in value.items()}
    if hasattr(value, "state_dict"):
        raise refuse(where, value)  # says: pass it under modules=
    raise CheckpointError(
        f"cannot save the training state: {where} is a {type(value).__name__}, but extra= holds only "
        "JSON values (numbers, strings, lists, dicts with string keys); pass an object with a "
        "state_dict under modules={name: obj}, and a tensor as tensor.tolist() or as a module's buffer"
    )
