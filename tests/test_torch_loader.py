"""The README's loop with a shuffled DataLoader, cut mid-epoch and resumed, is bit-identical.

A plain DataLoader loses its place: the epoch's permutation was drawn before the cut, so a resumed
run sees some samples twice and others never. torchdata's StatefulDataLoader, passed in
``loaders=``, saves the position; these tests train N steps uninterrupted and the same N steps cut
(mid-epoch, and at an epoch's last batch) and resumed into fresh objects, with 0 and 2 workers, and
compare the sample indices seen and every tensor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gpupool.errors import CheckpointError
from gpupool.torch import load_training_state, save_training_state

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata's

SAMPLES = 64
BATCH = 4  # 16 steps per epoch
TOTAL_STEPS = 40  # two and a half epochs


class Samples(torch.utils.data.Dataset):
    """Sample i is (i, features of i, target of i); the index lets the test see the order."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        x = torch.linspace(-1, 1, 6) * (index + 1) / SAMPLES
        return index, x, x.sum(dim=0, keepdim=True).sin()


@dataclass
class Run:
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    loader: Any
    seen: list[int] = field(default_factory=list)

    def parts(self) -> dict[str, Any]:
        """What the script passes to save_training_state and load_training_state."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "loaders": {"train": self.loader},
            "modules": {"ema": self.ema},
        }


def build(seed: int, workers: int) -> Run:
    """Everything as a script builds it; ``seed`` differs between runs so nothing matches by luck."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = stateful_dataloader.StatefulDataLoader(
        Samples(),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    return Run(model, ema, optimizer, loader)


def train(run: Run, step: int, stop: int) -> None:
    """The README's loop: epochs of the loader until ``stop``; a resumed loader resumes mid-epoch."""
    run.model.train()
    while step < stop:
        for index, x, y in run.loader:
            run.seen.extend(index.tolist())
            loss = torch.nn.functional.mse_loss(run.model(x), y)  # dropout draws torch's RNG
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.ema.update_parameters(run.model)
            step += 1
            if step == stop:
                return


def tensors(run: Run) -> dict[str, torch.Tensor]:
    named = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    named |= {f"ema.{k}": v for k, v in run.ema.state_dict().items()}
    for pid, slots in run.optimizer.state_dict()["state"].items():
        named |= {f"optimizer.{pid}.{k}": v for k, v in slots.items() if isinstance(v, torch.Tensor)}
    return named


def cut_and_resume(tmp_path: Path, workers: int, cuts: list[int]) -> Run:
    run, step = build(seed=0, workers=workers), 0
    seen: list[int] = []
    for i, cut in enumerate([*cuts, TOTAL_STEPS]):
        train(run, step, cut)
        seen += run.seen
        if cut == TOTAL_STEPS:
            break
        save_training_state(tmp_path / f"ckpt-{i}", step=cut, **run.parts())
        run = build(seed=100 + i, workers=workers)  # a fresh session: new objects, other seeds
        step = load_training_state(tmp_path / f"ckpt-{i}", **run.parts()).step
    run.seen = seen
    return run


@pytest.mark.parametrize(
    ("workers", "cuts"),
    [(0, [5, 16, 21, 31]), (2, [21])],  # mid-epoch, an epoch's last batch, mid-epoch again
)
def test_shuffled_loader_cut_mid_epoch_resumes_bit_identical(
    tmp_path: Path, workers: int, cuts: list[int]
) -> None:
    expected = build(seed=0, workers=workers)
    train(expected, 0, TOTAL_STEPS)
    resumed = cut_and_resume(tmp_path, workers, cuts)
    assert resumed.seen == expected.seen
    assert sorted(expected.seen[:SAMPLES]) == list(range(SAMPLES))  # each sample once an epoch
    want, got = tensors(expected), tensors(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_plain_dataloader_is_refused_at_save(tmp_path: Path) -> None:
    """The case the issue measured (13 of 64 samples seen twice): refused, naming the fix."""
    loader = torch.utils.data.DataLoader(Samples(), batch_size=BATCH, shuffle=True)
    with pytest.raises(CheckpointError, match=r"loaders\['train'\].*StatefulDataLoader"):
        save_training_state(tmp_path, model=torch.nn.Linear(6, 1), loaders={"train": loader}, step=0)
    assert not (tmp_path / "state.pt").exists()


def test_loader_missing_from_the_saved_state_is_named(tmp_path: Path) -> None:
    run = build(seed=0, workers=0)
    save_training_state(tmp_path, model=run.model, optimizer=run.optimizer, step=0)
    with pytest.raises(CheckpointError, match=r"no state was saved for loaders\['train'\]"):
        load_training_state(
            tmp_path, model=run.model, optimizer=run.optimizer, loaders={"train": run.loader}
        )


def test_loader_state_from_another_num_workers_is_a_clear_mismatch(tmp_path: Path) -> None:
    """torchdata cannot move a position between 0 and N workers; say so, not a bare AssertionError."""
    run = build(seed=0, workers=0)
    train(run, 0, 5)
    save_training_state(tmp_path, step=5, **run.parts())
    other = build(seed=1, workers=2)
    differently = r"loaders\['train'\] was saved by a data loader built differently.*num_workers"
    with pytest.raises(CheckpointError, match=differently):
        load_training_state(tmp_path, **other.parts())
