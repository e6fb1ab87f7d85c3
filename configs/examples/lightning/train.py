"""A Lightning run made resumable by gpupool: a small MLP on a synthetic regression task.

The gpupool lines are marked; the rest is an ordinary Lightning script. With the callback, a run
cut at an epoch's end resumes bit-identically; one cut mid-epoch restarts that epoch's shuffle
(the README gives the measured difference, and what torchdata's StatefulDataLoader changes).
Standalone (no gpupool) it runs the same way, writing its checkpoints into ./checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpupool.integrations.lightning import GpupoolCallback, ckpt_path  # gpupool

MAX_EPOCHS = int(os.environ.get("MAX_EPOCHS", "40"))
SAMPLES = int(os.environ.get("SAMPLES", "4096"))
BATCH = int(os.environ.get("BATCH", "64"))
WORKERS = int(os.environ.get("WORKERS", "0"))
STATEFUL = os.environ.get("LOADER") == "stateful"  # torchdata's StatefulDataLoader, measured in the README
SEED = 1234


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(SAMPLES, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    if STATEFUL:  # see the README: exact within the cut epoch, not after it
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=WORKERS)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=WORKERS)


def main(extra_callbacks: list | None = None) -> None:
    pl.seed_everything(SEED, verbose=False)
    model = Regressor()
    trainer = pl.Trainer(
        max_epochs=MAX_EPOCHS, accelerator="auto", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*(extra_callbacks or []), GpupoolCallback()],  # gpupool: report, save, stop
    )
    trainer.fit(model, make_loader(), ckpt_path=ckpt_path())  # gpupool: None at first
    Path("final").mkdir(exist_ok=True)  # reached only when training finished (a yield exits 75)
    torch.save(model.state_dict(), "final/model.pt")
    print(f"done: step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
