"""gpupool.torch: a run resumed from saved state ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpupool import runtime
from gpupool.errors import CheckpointError, CorruptCheckpoint
from gpupool.manifest import list_local
from gpupool.torch import (
    STATE_FILE,
    load_training_state,
    save_training_state,
    snapshot_training_state,
)

TOTAL_STEPS = 24
BATCH = 8
DATA = torch.linspace(-1, 1, 64 * 6).reshape(64, 6)
TARGET = DATA.sum(dim=1, keepdim=True).sin()


@dataclass
class Run:
    """One training run's objects, built the way a script builds them before restoring."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loader_gen: torch.Generator
    aug_rng: np.random.Generator

    def generators(self) -> dict[str, Any]:
        return {"loader": self.loader_gen, "augment": self.aug_rng}

    def components(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "lr_scheduler": self.scheduler,
            "grad_scaler": self.scaler,
            "generators": self.generators(),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(schedule: str, seed: int) -> Run:
    """A tiny MLP with dropout, AdamW, a scheduler and an enabled scaler; init draws RNG."""
    seed_everything(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    if schedule == "step":
        scheduler: Any = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.05, total_steps=TOTAL_STEPS
        )
    # Enabled on CPU so scale and growth tracker are real state; growth every 3 steps changes them.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    loader_gen = torch.Generator().manual_seed(seed + 1)
    aug_rng = np.random.default_rng(seed + 2)
    return Run(model, optimizer, scheduler, scaler, loader_gen, aug_rng)


def train_step(run: Run) -> None:
    """One step that draws from every RNG the state must carry."""
    idx = torch.randperm(len(DATA), generator=run.loader_gen)[:BATCH]  # data shuffling
    x = DATA[idx] + 0.01 * torch.randn(BATCH, 6)  # torch CPU RNG
    x = x * (1 + 0.1 * random.random())  # Python random
    x = x + torch.from_numpy(0.01 * np.random.randn(BATCH, 6)).float()  # NumPy global RNG
    x = x + torch.from_numpy(run.aug_rng.normal(0, 0.01, (BATCH, 6))).float()
    loss = torch.nn.functional.mse_loss(run.model(x), TARGET[idx])  # dropout: torch CPU RNG
    run.optimizer.zero_grad()
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()


def train(run: Run, start: int, stop: int) -> None:
    run.model.train()
    for _ in range(start, stop):
        train_step(run)


def uninterrupted(schedule: str) -> Run:
    run = build_run(schedule, seed=0)
    train(run, 0, TOTAL_STEPS)
    return run


def resume(directory: Path, schedule: str, seed: int) -> tuple[Run, int]:
    """Restore into fresh objects built under a different seed, so nothing matches by accident."""
    run = build_run(schedule, seed=seed)
    state = load_training_state(directory, **run.components())
    return run, state.step


def assert_same_run(a: Run, b: Run) -> None:
    for (name, pa), (_, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert_same_state(a.optimizer.state_dict(), b.optimizer.state_dict())
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert a.scaler.state_dict() == b.scaler.state_dict()


def assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("schedule", ["step", "onecycle"])
def test_resumed_run_is_bit_identical(tmp_path: Path, schedule: str) -> None:
    expected = uninterrupted(schedule)
    run, step = build_run(schedule, seed=0), 0
    for i, stop in enumerate([1, 7, 16, TOTAL_STEPS]):
        train(run, step, stop)
        directory = tmp_path / f"ckpt-{i}"
        assert save_training_state(directory, step=stop, extra={"i": i}, **run.components()) == [
            STATE_FILE
        ]
        seed_everything(1000 + i)  # scramble every global RNG between save and load
        run, step = resume(directory, schedule, seed=100 + i)
        assert step == stop
    assert_same_run(run, expected)


def test_rng_restore_is_what_makes_it_identical(tmp_path: Path) -> None:
    """Control: scrambling the RNGs after loading breaks identity, so the test above has teeth."""
    expected = uninterrupted("step")
    run = build_run("step", seed=0)
    train(run, 0, 10)
    save_training_state(tmp_path, step=10, **run.components())
    run, step = resume(tmp_path, "step", seed=5)
    seed_everything(7)
    train(run, step, TOTAL_STEPS)
    params = zip(run.model.parameters(), expected.model.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in params)


def test_background_checkpoint_of_a_snapshot_resumes_exactly(tmp_path: Path) -> None:
    """The one asynchronous path: snapshot now, write + publish in the session's thread."""
    expected = uninterrupted("onecycle")
    run = build_run("onecycle", seed=0)
    train(run, 0, 9)
    session = runtime.Session({runtime.ENV_SESSION_DIR: str(tmp_path / "session")}, install_sigterm=False)
    snapshot = snapshot_training_state(step=9, **run.components())
    session.checkpoint_in_background(9, snapshot.write)
    train(run, 9, 12)  # mutates model and optimizer while (or before) the thread writes
    session.wait_for_background()
    manifest = list_local(session.checkpoint_root)[0]
    assert [f.path for f in manifest.files] == [STATE_FILE]
    run, step = resume(session.checkpoint_root / manifest.name, "onecycle", seed=3)
    train(run, step, TOTAL_STEPS)
    assert_same_run(run, expected)


def test_snapshot_write_error_is_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    snapshot = snapshot_training_state(model=torch.nn.Linear(2, 2), step=0)
    with pytest.raises(OSError):
        snapshot.write(blocker)


def test_snapshot_is_independent_of_later_training(tmp_path: Path) -> None:
    """Written only after training went on, the snapshot still holds the state at snapshot time."""
    expected = uninterrupted("step")
    run = build_run("step", seed=0)
    train(run, 0, 5)
    snapshot = snapshot_training_state(step=5, **run.components())
    train(run, 5, 11)
    assert snapshot.write(tmp_path) == [STATE_FILE]
    run, step = resume(tmp_path, "step", seed=9)
    assert step == 5
    train(run, step, TOTAL_STEPS)
    assert_same_run(run, expected)


def test_state_file_loads_with_weights_only(tmp_path: Path) -> None:
    run = build_run("step", seed=0)
    train(run, 0, 3)
    save_training_state(tmp_path, step=3, extra={"lr": 0.01, "tags": ["a"]}, **run.components())
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert payload["step"] == 3
    assert {
        "model",
        "optimizer",
        "lr_scheduler",
        "grad_scaler",
        "rng",
        "generators",
    } <= payload.keys()
    with pytest.warns(RuntimeWarning, match="not passed to load_training_state"):  # model only
        state = load_training_state(tmp_path, model=build_run("step", seed=1).model)
    assert (state.step, state.extra) == (3, {"lr": 0.01, "tags": ["a"]})


def test_python_random_instances_are_restored(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    rng = random.Random(4)
    save_training_state(tmp_path, model=model, generators={"r": rng}, step=0)
    expected = [rng.random() for _ in range(3)]
    rng = random.Random(99)
    load_training_state(tmp_path, model=model, generators={"r": rng})
    assert [rng.random() for _ in range(3)] == expected


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    for step in range(3):
        save_training_state(tmp_path, model=model, step=step)
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_extra_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"extra\['t'\] is a Tensor"):
        save_training_state(
            tmp_path, model=torch.nn.Linear(2, 2), step=0, extra={"t": torch.ones(1)}
        )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_state_file_raises_clear_error(tmp_path: Path, damage: str) -> None:
    model = torch.nn.Linear(4, 4)
    save_training_state(
        tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters()), step=1
    )
    path = tmp_path / STATE_FILE
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 50, "empty": b""}[
            damage
        ]
    )
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        load_training_state(tmp_path, model=model)


def test_missing_state_file_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no state.pt in .*nowhere: no such folder"):
        load_training_state(tmp_path / "nowhere", model=torch.nn.Linear(2, 2))
    (tmp_path / "last.pt").write_bytes(b"")  # a folder some other saver wrote
    with pytest.raises(CheckpointError, match=r"no state.pt .*\['last.pt'\].*not written by") as info:
        load_training_state(tmp_path, model=torch.nn.Linear(2, 2))
    assert not isinstance(info.value, CorruptCheckpoint)  # an earlier checkpoint would not help


def test_pickled_code_is_refused_as_what_it_is(tmp_path: Path) -> None:
    """A file with arbitrary objects (not loadable under weights_only) is refused, not executed,
    and not called corrupt: its bytes are fine, and an earlier checkpoint would not help."""
    torch.save({"format": "gpupool.training_state", "obj": Path("x")}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"intact but holds pathlib\..*Path at state\['obj'\]") as info:
        load_training_state(tmp_path, model=torch.nn.Linear(2, 2))
    assert not isinstance(info.value, CorruptCheckpoint)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(1)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a gpupool training state") as info:
        load_training_state(tmp_path, model=torch.nn.Linear(2, 2))
    assert not isinstance(info.value, CorruptCheckpoint)


def test_component_or_generator_missing_from_state(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    save_training_state(tmp_path, model=model, step=0)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_training_state(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters()))
    with pytest.raises(CheckpointError, match="generator"):
        load_training_state(tmp_path, model=model, generators={"loader": torch.Generator()})
