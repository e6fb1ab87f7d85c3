"""Make a training state loadable under ``torch.load(weights_only=True)``, or refuse it at save time.

A state dict may hold values that ``torch.save`` writes happily but a weights-only load refuses:
NumPy scalars (AdamW built with ``lr=np.float64(3e-4)``, a NumPy-computed ``T_max``), NumPy arrays
(a module's extra state), or arbitrary objects (an enum, a path, a whole model). Saving them would
give a checkpoint that never loads, in every later session. So before writing:

- NumPy scalars and arrays are *encoded* as a small tagged dict holding their bytes as a uint8
  tensor, their dtype string and shape, and decoded back to the same NumPy type on load: exact, and
  the script gets back what it saved.
- Anything else a weights-only load refuses raises CheckpointError naming its key, e.g.
  ``optimizer['param_groups'][0]['betas']``, with what to do instead.

The allowed leaf types mirror torch's weights-only unpickler (``torch._weights_only_unpickler``):
None, bool, int, float, complex, str, bytes, bytearray, plain tensors and parameters, dtypes,
devices, ``torch.Size``, and the classes the user allow-listed with
``torch.serialization.add_safe_globals``; containers dict, OrderedDict, Counter, list, tuple and set.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import torch

from gpupool.errors import CheckpointError

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the supported environments
    np = None  # type: ignore[assignment]

# The key that marks an encoded NumPy value; long and namespaced so no user dict has it by chance.
NUMPY_MARK = "__gpupool_numpy__"

_PLAIN_TYPES: frozenset[type] = frozenset(
    {type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size}
)
_TENSOR_TYPES: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})


def make_loadable(value: Any, where: str) -> Any:
    """Return ``value`` with every NumPy value encoded; raise CheckpointError naming the key if any
    part of it would not load under ``torch.load(weights_only=True)``.

    ``where`` is the key of ``value`` in the training state (``"model"``, ``"optimizer"`` ...),
    used in the error. Containers are rebuilt; tensors are shared, not copied.
    """
    kind = type(value)
    if kind in _PLAIN_TYPES or kind in _TENSOR_TYPES:
        return value
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return _encode_numpy(value, where)
    if kind in (dict, OrderedDict, Counter):
        return _rebuild_dict(value, where, make_loadable, _loadable_key)
    if kind in (list, tuple, set):
        return kind(make_loadable(item, f"{where}[{index}]") for index, item in enumerate(value))
    if _user_allowed(kind):
        return value
    raise refuse(where, value)


def restore_numpy(value: Any) -> Any:
    """Undo make_loadable's NumPy encoding, everywhere in ``value`` (other values are kept)."""
    kind = type(value)
    if kind in (dict, OrderedDict, Counter):
        if NUMPY_MARK in value:
            return _decode_numpy(value)
        return _rebuild_dict(value, "", lambda item, _where: restore_numpy(item), lambda key, _: key)
    if kind in (list, tuple):
        return kind(restore_numpy(item) for item in value)
    return value


def refuse(where: str, value: Any) -> CheckpointError:
    """The error for a value that cannot be saved so that it loads: what, where, what to do."""
    kind = type(value)
    what = f"{kind.__module__}.{kind.__qualname__}"
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        fix = (
            "pass the object itself to save_training_state under modules={name: obj} "
            "(or loaders= for a data loader), which saves its state_dict"
        )
    elif isinstance(value, torch.Tensor):
        fix = "save a plain tensor (e.g. tensor.as_subclass(torch.Tensor))"
    else:
        fix = (
            "store it as tensors, numbers, strings, lists or dicts (e.g. an enum's .value, str(path)),"
            " or allow its class with torch.serialization.add_safe_globals in every session"
        )
    return CheckpointError(
        f"cannot save the training state: {where} is a {what}, which torch.load(weights_only=True) "
        f"refuses, so no later session could load it; {fix}"
    )


def _rebuild_dict(value: Any, where: str, convert_value: Any, convert_key: Any) -> Any:
    rebuilt = type(value)()
    for key, item in value.items():
        rebuilt[convert_key(key, where)] = convert_value(item, f"{where}[{key!r}]")
    # Module state dicts carry per-module versions here; load_state_dict uses them to migrate.
    metadata = getattr(value, "_metadata", None)
    if metadata is not None:
        rebuilt._metadata = metadata
    return rebuilt


def _loadable_key(key: Any, where: str) -> Any:
    """Dict keys can't be encoded (a dict is unhashable): NumPy scalar keys become Python ones."""
    if np is not None and isinstance(key, np.generic):
        key = key.item()  # equal and same hash, so lookups by the old key still work
    if type(key) in _PLAIN_TYPES:
        return key
    raise refuse(f"a key of {where}", key)


def _user_allowed(kind: type) -> bool:
    for entry in torch.serialization.get_safe_globals():
        if (entry[0] if isinstance(entry, tuple) else entry) is kind:
            return True
    return False


def _encode_numpy(value: Any, where: str) -> dict[str, Any]:
    array = np.asarray(value)
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise CheckpointError(
            f"cannot save the training state: {where} is a NumPy array of dtype {array.dtype}, whose "
            "items are Python objects or records that torch.load(weights_only=True) refuses; "
            "convert it to a numeric array, a tensor or a list first"
        )
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return {
        NUMPY_MARK: "scalar" if isinstance(value, np.generic) else "array",
        "dtype": array.dtype.str,  # e.g. '<f8': byte order and size, so the bytes read back exactly
        "shape": list(array.shape),
        "data": torch.from_numpy(raw.copy()),
    }


def _decode_numpy(encoded: dict[str, Any]) -> Any:
    if np is None:  # pragma: no cover - numpy ships with the supported environments
        raise CheckpointError("this training state holds NumPy values; install numpy to load it")
    raw = encoded["data"].cpu().numpy().tobytes()
    array = np.frombuffer(raw, dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"]).copy()
    return array[()] if encoded[NUMPY_MARK] == "scalar" else array
