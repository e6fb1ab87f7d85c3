"""Every RNG a training loop draws from, as values that load under ``torch.load(weights_only=True)``.

Process-wide: Python's ``random``, NumPy's global RNG, torch's CPU and CUDA RNGs. Script-owned:
``torch.Generator`` (any device), ``numpy.random.Generator`` and ``random.Random`` objects passed in
``generators=``. Python's and NumPy's states become tensors and lists, so no pickled object is
needed to read them back.

A torch generator's state depends on its device kind: a CPU generator is a Mersenne Twister
(5056 bytes of state), a CUDA one is Philox (seed and offset). A session on another device kind
(a GPU run resumed on the local provider's CPU fallback) cannot continue the same stream, so the
generator is reseeded deterministically from the saved state, with a RuntimeWarning saying so.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable
from typing import Any

import torch

from gpupool.errors import CheckpointError

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the supported environments
    np = None  # type: ignore[assignment]

# Size of a CPU torch.Generator's state (CPUGeneratorImplState); files written before the
# generator's device was recorded are told apart by it.
_CPU_GENERATOR_STATE_BYTES = 5056


def global_rng_state() -> dict[str, Any]:
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


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what global_rng_state returned; CUDA states only on as many GPUs as both have."""
    random.setstate(_python_random_tuple(state["python"]))
    torch.set_rng_state(state["torch_cpu"].cpu())
    if np is not None and state["numpy"] is not None:
        np.random.set_state(_numpy_legacy_tuple(state["numpy"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index].cpu(), index)


def generator_state(gen: Any, where: str) -> dict[str, Any]:
    """One script-owned generator's state, tagged with its kind (and device) so loading can check."""
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": gen.device.type, "state": gen.get_state()}
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": _python_random_state(gen.getstate())}
    if np is not None and isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": _plain_numpy(gen.bit_generator.state)}
    raise CheckpointError(
        f"cannot save the training state: {where} is a {type(gen).__name__}, not a random number "
        "generator; pass torch.Generator, numpy.random.Generator or random.Random in generators="
    )


def set_generator_state(
    gen: Any, saved: dict[str, Any], where: str, mismatch: Callable[[str], Exception]
) -> None:
    """Restore ``gen`` from generator_state's dict; ``mismatch(reason)`` builds the error to raise."""
    kind = generator_state(gen, where)["kind"]  # also rejects unsupported types, like saving does
    if saved["kind"] != kind:
        raise mismatch(f"{where} was saved as a {saved['kind']} generator, not {kind}")
    if kind == "torch":
        _set_torch_generator(gen, saved, where)
    elif kind == "python":
        gen.setstate(_python_random_tuple(saved["state"]))
    else:
        # NumPy's bit-generator state setters accept lists where they produced arrays.
        gen.bit_generator.state = saved["state"]


def _set_torch_generator(gen: torch.Generator, saved: dict[str, Any], where: str) -> None:
    state = saved["state"].cpu()
    saved_device = saved.get("device") or _guess_device(state)
    if saved_device == gen.device.type:
        gen.set_state(state)
        return
    # Different algorithms (Mersenne Twister on CPU, Philox on CUDA): no state converts, so seed
    # from the saved state, which is the same for every resume of this checkpoint.
    seed = int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little") >> 1
    gen.manual_seed(seed)
    warnings.warn(
        f"{where} was saved on {saved_device} and is restored on {gen.device.type}: the two draw "
        "different random streams, so it was reseeded from its saved state; this run continues but "
        f"does not repeat the draws an uninterrupted run on {saved_device} would make",
        RuntimeWarning,
        stacklevel=5,  # the script's load_training_state call
    )


def _guess_device(state: torch.Tensor) -> str:
    return "cpu" if state.numel() == _CPU_GENERATOR_STATE_BYTES else "cuda"


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


def _plain_numpy(obj: Any) -> Any:
    """A NumPy bit-generator state with arrays as lists and NumPy scalars as Python ones."""
    if isinstance(obj, dict):
        return {key: _plain_numpy(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
