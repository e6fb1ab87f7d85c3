"""The state file on disk: written atomically and proven to load, read back with errors that say why.

Writing: a temp file in the same directory, fsynced, its pickle checked against torch's
weights-only allow-list (``torch.serialization.get_unsafe_globals_in_checkpoint``), and only then
renamed over ``state.pt``. A file that would not load never replaces a good one.

Reading tells failures apart, because they need different fixes:
- the bytes are bad (truncated, garbage, not a torch file): CorruptCheckpoint, use an earlier one;
- the file is intact but holds objects a weights-only load refuses (written by something other
  than save_training_state): CheckpointError naming the key and the class;
- the file is intact but ``map_location`` names a device this machine lacks, or there is no
  state.pt at all: CheckpointError saying so;
- tensors saved on a device this machine lacks are *not* a failure: they load onto the CPU.
Files written before NumPy values were encoded (NumPy scalars and arrays pickled as such) still
load: those NumPy classes are allowed for that one load.
"""

from __future__ import annotations

import importlib
import os
import pickle
import uuid
import zipfile
from typing import Any

import torch

from gpupool.errors import CheckpointError, CorruptCheckpoint

# What pickle and torch raise on a damaged file (torch raises RuntimeError for a bad zip archive).
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError)

# The globals NumPy pickles scalars and arrays with; they rebuild values, they run no user code.
_NUMPY_VALUE_GLOBALS = frozenset({"scalar", "_reconstruct", "ndarray", "dtype"})


def write_verified(directory: str, filename: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as ``directory/filename`` atomically, after checking it loads back."""
    os.makedirs(directory, exist_ok=True)
    # A unique name (not mkstemp, which makes files 0600): the file gets the umask's permissions.
    tmp_path = os.path.join(directory, f".{filename}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp_path, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _check_loads(tmp_path)
        os.replace(tmp_path, os.path.join(directory, filename))
    except BaseException:
        _remove_quietly(tmp_path)
        raise
    _fsync_directory(directory)


def _check_loads(path: str) -> None:
    """Refuse a file that torch.load(weights_only=True) would refuse: one whose pickle names a class
    or function outside torch's allow-list. Checked statically by torch's own
    get_unsafe_globals_in_checkpoint, so it costs a read of the pickle (well under a millisecond
    for a small state), not a load of every tensor (about as long as the save)."""
    unsafe = _unsafe_globals(path)
    if unsafe is None:
        raise CheckpointError(f"cannot save the training state: {path} did not read back as a torch file")
    if unsafe:
        keys = _keys_holding(path, unsafe)
        held = ", ".join(sorted(unsafe)) + (f" at {', '.join(keys)}" if keys else "")
        raise CheckpointError(
            f"cannot save the training state: it holds {held}, which torch.load(weights_only=True) "
            "refuses, so no later session could load it; nothing was written. Store such values as "
            "tensors, numbers, strings, lists or dicts"
        )


def _load_back(path: str) -> None:
    """Load the file onto the CPU, mapping it rather than reading it where the filesystem allows."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError):  # a filesystem that can't mmap (some FUSE mounts): read it
        torch.load(path, map_location="cpu", weights_only=True)


def read_payload(path: str, map_location: Any) -> Any:
    """torch.load with weights_only=True; each way it can fail becomes the error that fits it.

    ``map_location`` as for torch.load; None keeps each tensor on the device it was saved on when
    this machine has that device, and puts it on the CPU when it does not.
    """
    if not os.path.isfile(path):
        raise _missing(path)
    location = _restore_location if map_location is None else map_location
    try:
        return torch.load(path, map_location=location, weights_only=True)
    except _UNREADABLE as exc:
        unsafe = _unsafe_globals(path)
        if unsafe is None:
            raise corrupt(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
        if not unsafe:  # an intact file: the bytes are not the problem, maybe map_location is
            return _load_on_cpu_or_say_why(path, map_location, exc)
        if unsafe <= _numpy_globals(unsafe):
            return _load_allowing(path, location, unsafe)
        raise _refused(path, unsafe) from exc


def _missing(path: str) -> CheckpointError:
    """No state.pt: the folder was not written by save_training_state (or is not there at all)."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return CheckpointError(f"cannot load the training state: no state.pt in {directory}: no such folder")
    held = sorted(os.listdir(directory))[:10]
    return CheckpointError(
        f"cannot load the training state: no state.pt in {directory} (it holds {held or 'nothing'}); "
        "this checkpoint was not written by gpupool.torch.save_training_state, so load it the way "
        "it was saved"
    )


def _load_on_cpu_or_say_why(path: str, map_location: Any, first: BaseException) -> Any:
    """The file opens and holds only allowed types, yet did not load: if it loads onto the CPU,
    the asked-for map_location was the problem (e.g. "cuda" on a machine without a GPU)."""
    try:
        _load_back(path)
    except _UNREADABLE as exc:
        raise corrupt(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    raise CheckpointError(
        f"training state {path} is intact but could not be placed with map_location={map_location!r}"
        f" ({type(first).__name__}: {first}); pass map_location='cpu', or None to keep each tensor "
        "on its saved device where this machine has it"
    ) from first


def corrupt(path: str, reason: str) -> CorruptCheckpoint:
    """The file's bytes can't be used at all: say so, and what to do about it."""
    return CorruptCheckpoint(path, f"{reason}; restore from an earlier verified checkpoint")


def _restore_location(storage: Any, location: str) -> Any:
    """map_location=None: keep the saved device when it exists here, else the CPU (``storage``
    arrives on the CPU). A GPU session's state must load in a CPU-only session."""
    try:
        return torch.serialization.default_restore_location(storage, location)
    except RuntimeError:  # e.g. "deserialize object on a CUDA device but ... is_available() is False"
        return storage


def _unsafe_globals(path: str) -> set[str] | None:
    """The classes and functions in the file that a weights-only load refuses; None if the file
    is not an intact torch file (then it is corrupt, not refused)."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except _UNREADABLE:
        return None


def _numpy_globals(names: set[str]) -> set[str]:
    """Those of ``names`` that are NumPy's value-rebuilding classes (numpy.dtype, ...Float64DType)."""
    found = set()
    for name in names:
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] == "numpy" and (
            attr in _NUMPY_VALUE_GLOBALS or (module.endswith("dtypes") and attr.endswith("DType"))
        ):
            found.add(name)
    return found


def _load_allowing(path: str, location: Any, names: set[str]) -> Any:
    # The dtype classes (Float64DType ...) are reached through numpy.dtype, so no list names them.
    allowed: list[Any] = [(_import_global(name), name) for name in names] + _numpy_dtype_classes()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=location, weights_only=True)
    except _UNREADABLE as exc:
        raise _refused(path, names) from exc


def _numpy_dtype_classes() -> list[type]:
    import numpy as np  # only files holding NumPy values get here

    return [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]


def _import_global(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _refused(path: str, unsafe: set[str]) -> CheckpointError:
    keys = _keys_holding(path, unsafe)
    where = f" at {', '.join(keys)}" if keys else ""
    return CheckpointError(
        f"training state {path} is intact but holds {', '.join(sorted(unsafe))}{where}, which "
        "torch.load(weights_only=True) refuses to load (it could run code); it was not written by "
        "gpupool's save_training_state, which refuses such values. Save the state again with "
        "save_training_state, or, only if you trust the file, allow those classes with "
        "torch.serialization.add_safe_globals"
    )


class _Placeholder:
    """Stands in for a refused class or function while locating it; never runs anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass


def _keys_holding(path: str, unsafe: set[str]) -> list[str]:
    """Where in the payload the refused globals sit: loaded with inert placeholders in their place
    (through torch's own weights-only unpickler, so nothing else is allowed either)."""
    stand_ins: list[Any] = [(type(name, (_Placeholder,), {}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE:
        return []
    return _placeholder_paths(payload, "state")[:5]


def _placeholder_paths(value: Any, where: str) -> list[str]:
    if isinstance(value, _Placeholder):
        return [where]
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple, set)):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in _placeholder_paths(item, f"{where}[{key!r}]")]


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
