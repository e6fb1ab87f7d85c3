"""A checkpoint that saved is a checkpoint that loads (issue 12, kind 6).

What save_training_state writes loads under torch.load(weights_only=True): NumPy values are
converted (and come back as they were), anything else is refused at save time naming its key. A
load that fails for a reason other than damaged bytes says what it is, never "corrupt". State saved
on a GPU loads in a CPU-only session.
"""

from __future__ import annotations

import enum
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpupool.errors import CheckpointError, CorruptCheckpoint
from gpupool.torch import STATE_FILE, load_training_state, save_training_state

X = torch.linspace(-1, 1, 24).reshape(4, 6)


def make(lr: Any = 3e-4, t_max: Any = 10) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)


def steps(model: torch.nn.Module, optimizer: Any, scheduler: Any, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(X).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_numpy_lr_and_t_max_save_load_and_continue_exactly(tmp_path: Path) -> None:
    """The issue's case: AdamW(lr=np.float64(3e-4)) and a NumPy T_max; before, the file saved but
    every load raised, and was called corrupt."""
    lr, t_max = np.float64(3e-4), np.int64(np.ceil(np.float64(9.5)))
    model, optimizer, scheduler = make(lr, t_max)
    optimizer.param_groups[0]["betas"] = (np.float64(0.9), np.float32(0.99))  # tuples too
    steps(model, optimizer, scheduler, 3)
    save_training_state(tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler, step=3)
    torch.load(tmp_path / STATE_FILE, weights_only=True)  # torch's own check, no allow-list
    steps(model, optimizer, scheduler, 3)

    fresh = make()
    load_training_state(tmp_path, model=fresh[0], optimizer=fresh[1], lr_scheduler=fresh[2])
    assert type(fresh[1].param_groups[0]["initial_lr"]) is np.float64  # back as it was saved
    assert type(fresh[2].T_max) is np.int64
    assert fresh[1].param_groups[0]["betas"] == (np.float64(0.9), np.float32(0.99))
    assert type(fresh[1].param_groups[0]["betas"][1]) is np.float32
    steps(*fresh, 3)
    assert torch.equal(fresh[0].weight, model.weight) and torch.equal(fresh[0].bias, model.bias)


class Normalizer(torch.nn.Module):
    """A module whose extra state is a NumPy array (running statistics kept outside tensors)."""

    def __init__(self, stats: Any) -> None:
        super().__init__()
        self.stats = stats

    def get_extra_state(self) -> Any:
        return self.stats

    def set_extra_state(self, state: Any) -> None:
        self.stats = state


@pytest.mark.parametrize(
    "stats",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([1, 2**40], dtype=np.uint64),
        np.array(["ab", "c"]),
        {"mean": np.float32(0.5), "counts": [np.int16(3)], 7: np.bool_(True)},
    ],
    ids=["float32-2d", "uint64", "unicode", "nested-scalars"],
)
def test_module_extra_state_of_numpy_values_round_trips(tmp_path: Path, stats: Any) -> None:
    save_training_state(tmp_path, model=Normalizer(stats), step=0)
    torch.load(tmp_path / STATE_FILE, weights_only=True)
    restored = Normalizer(None)
    load_training_state(tmp_path, model=restored)
    assert_same_numpy(restored.stats, stats)


def assert_same_numpy(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_numpy(got[key], want[key])
    elif isinstance(want, list):
        for a, b in zip(got, want, strict=True):
            assert_same_numpy(a, b)
    else:
        assert got == want


class Color(enum.Enum):
    RED = 1


@pytest.mark.parametrize(
    ("stats", "key"),
    [
        (Color.RED, "Color"),
        (Path("data/train"), "Path"),
        (np.array([object()], dtype=object), "dtype object"),
        ({"nested": [1, {"deep": Color.RED}]}, r"\['nested'\]\[1\]\['deep'\]"),
        (torch.nn.Linear(2, 2), "modules="),
    ],
    ids=["enum", "path", "object-array", "nested", "whole-module"],
)
def test_what_cannot_load_is_refused_at_save_naming_the_key(
    tmp_path: Path, stats: Any, key: str
) -> None:
    good = Normalizer(np.zeros(2))
    save_training_state(tmp_path, model=good, step=1)
    before = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(CheckpointError, match=r"model\['_extra_state'\]") as info:
        save_training_state(tmp_path, model=Normalizer(stats), step=2)
    assert re.search(key, str(info.value)), str(info.value)
    assert (tmp_path / STATE_FILE).read_bytes() == before  # the good state is untouched
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra": {"ema": torch.nn.Linear(2, 2)}}, r"extra\['ema'\].*modules=\{name: obj\}"),
        ({"modules": {"ema": object()}}, r"modules\['ema'\] is a object, which has no state_dict"),
        ({"generators": {"g": 42}}, r"generators\['g'\] is a int, not a random number generator"),
        ({"modules": [torch.nn.Linear(2, 2)]}, r"modules= must map names to objects"),
    ],
    ids=["ema-in-extra", "no-state-dict", "not-a-generator", "modules-not-a-mapping"],
)
def test_unsaveable_arguments_are_refused_not_dropped(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        save_training_state(tmp_path, model=torch.nn.Linear(2, 2), step=0, **kwargs)
    assert not (tmp_path / STATE_FILE).exists()


def test_ema_passed_as_a_module_is_saved_and_restored(tmp_path: Path) -> None:
    ema = torch.nn.Linear(2, 2)
    save_training_state(tmp_path, model=torch.nn.Linear(2, 2), modules={"ema": ema}, step=0)
    fresh = torch.nn.Linear(2, 2)
    load_training_state(tmp_path, model=torch.nn.Linear(2, 2), modules={"ema": fresh})
    assert torch.equal(fresh.weight, ema.weight)


def test_saved_parts_not_passed_to_load_are_named(tmp_path: Path) -> None:
    """An EMA model forgotten at load time would silently restart from the live model: warn."""
    model = torch.nn.Linear(2, 2)
    save_training_state(tmp_path, model=model, modules={"ema": torch.nn.Linear(2, 2)}, step=0)
    with pytest.warns(RuntimeWarning, match=r"also holds modules\['ema'\], not passed"):
        load_training_state(tmp_path, model=model)


def test_numpy_scalars_in_extra_become_numbers(tmp_path: Path) -> None:
    save_training_state(
        tmp_path, model=torch.nn.Linear(2, 2), step=0, extra={"best": np.float32(0.25), "n": [np.int64(3)]}
    )
    assert load_training_state(tmp_path, model=torch.nn.Linear(2, 2)).extra == {"best": 0.25, "n": [3]}


def test_tensor_subclass_is_refused_at_save(tmp_path: Path) -> None:
    class Tagged(torch.Tensor):
        pass

    model = Normalizer(torch.ones(2).as_subclass(Tagged))
    with pytest.raises(CheckpointError, match=r"model\['_extra_state'\].*as_subclass"):
        save_training_state(tmp_path, model=model, step=0)


# -- loads that fail for a reason other than the bytes -------------------------------------------


def test_file_from_before_numpy_values_were_encoded_still_loads(tmp_path: Path) -> None:
    """A state.pt written by an older gpupool with a raw np.float64 inside is not corrupt: it loads."""
    model, optimizer, scheduler = make(np.float64(3e-4))
    save_training_state(tmp_path, model=model, optimizer=optimizer, step=4)
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    payload["version"] = 1
    payload["optimizer"]["param_groups"][0]["lr"] = np.float64(3e-4)  # as the old code wrote it
    payload["optimizer"]["param_groups"][0]["stats"] = np.arange(3.0)
    torch.save(payload, tmp_path / STATE_FILE)
    fresh_model, fresh_optimizer, _ = make()
    assert load_training_state(tmp_path, model=fresh_model, optimizer=fresh_optimizer).step == 4
    assert fresh_optimizer.param_groups[0]["lr"] == np.float64(3e-4)


def test_state_that_does_not_fit_is_a_mismatch_not_corrupt(tmp_path: Path) -> None:
    save_training_state(tmp_path, model=torch.nn.Linear(6, 1), step=0)
    fits = r"(?s)model does not fit the Linear.*size mismatch.*same architecture"
    with pytest.raises(CheckpointError, match=fits) as info:
        load_training_state(tmp_path, model=torch.nn.Linear(6, 2))
    assert not isinstance(info.value, CorruptCheckpoint)
    assert "earlier" not in str(info.value)


def test_a_device_this_machine_lacks_is_named_not_called_corrupt(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    save_training_state(tmp_path, model=torch.nn.Linear(2, 2), step=0)
    placed = r"intact but could not be placed with map_location='cuda'.*'cpu'"
    with pytest.raises(CheckpointError, match=placed) as info:
        load_training_state(tmp_path, model=torch.nn.Linear(2, 2), map_location="cuda")
    assert not isinstance(info.value, CorruptCheckpoint)


# -- device kinds: a GPU session's state in a CPU-only session ------------------------------------

_SAVE_AS_CUDA = {"on": False}


def _tag_as_cuda(storage: Any) -> str | None:
    """Tags every storage saved while on, as torch tags a CUDA tensor's storage (no GPU here)."""
    return "cuda:0" if _SAVE_AS_CUDA["on"] else None


def _never_restore(storage: Any, location: str) -> None:
    return None  # leave restoring to torch's own CPU and CUDA handlers


torch.serialization.register_package(0, _tag_as_cuda, _never_restore)


def save_as_on_gpu(directory: Path, model: torch.nn.Module, optimizer: Any, philox: torch.Tensor) -> None:
    """A state as a GPU session writes it: CUDA tensors, and a CUDA generator (Philox seed, offset)."""
    gen = torch.Generator().manual_seed(1)
    save_training_state(directory, model=model, optimizer=optimizer, generators={"g": gen}, step=7)
    payload = torch.load(directory / STATE_FILE, weights_only=True)
    payload["generators"]["g"] = {"kind": "torch", "device": "cuda", "state": philox}
    _SAVE_AS_CUDA["on"] = True
    try:
        torch.save(payload, directory / STATE_FILE)
    finally:
        _SAVE_AS_CUDA["on"] = False


PHILOX = torch.tensor([42, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)


@pytest.mark.parametrize("map_location", ["cpu", None])
def test_gpu_state_with_cuda_generator_loads_on_a_cpu_machine(tmp_path: Path, map_location: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model, optimizer, scheduler = make()
    steps(model, optimizer, scheduler, 2)
    save_as_on_gpu(tmp_path, model, optimizer, PHILOX)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really holds CUDA storages
        torch.load(tmp_path / STATE_FILE, weights_only=True)

    draws = []
    for _ in range(2):  # reseeded the same way every time: resuming twice gives the same run
        fresh_model, fresh_optimizer, _ = make(t_max=3)
        gen = torch.Generator()
        reseeded = r"generators\['g'\] was saved on cuda and is restored on cpu"
        with pytest.warns(RuntimeWarning, match=reseeded):
            state = load_training_state(
                tmp_path,
                model=fresh_model,
                optimizer=fresh_optimizer,
                generators={"g": gen},
                map_location=map_location,
            )
        assert state.step == 7 and fresh_model.weight.device.type == "cpu"
        assert torch.equal(fresh_model.weight, model.weight)
        draws.append(torch.rand(4, generator=gen))
    assert torch.equal(draws[0], draws[1])


def test_cuda_generator_from_an_older_file_without_its_device_loads(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    save_training_state(tmp_path, model=model, generators={"g": torch.Generator()}, step=0)
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    payload["generators"]["g"] = {"kind": "torch", "state": PHILOX}  # version 1 recorded no device
    torch.save(payload, tmp_path / STATE_FILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_training_state(tmp_path, model=model, generators={"g": torch.Generator()})
    assert any("saved on cuda" in str(w.message) for w in caught)


def test_file_is_checked_before_it_replaces_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop behind the key-by-key check: with that check switched off, a value that a
    weights-only load refuses is still caught when the written file is checked."""
    save_training_state(tmp_path, model=Normalizer(np.zeros(2)), step=1)
    before = (tmp_path / STATE_FILE).read_bytes()
    monkeypatch.setattr("gpupool.torch._components.make_loadable", lambda value, where: value)
    refused = r"holds pathlib\..*Path at state\['model'\]\['_extra_state'\].*nothing was written"
    with pytest.raises(CheckpointError, match=refused):
        save_training_state(tmp_path, model=Normalizer(Path("x")), step=2)
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]
