"""A small but real resumable training script: an MLP learning a synthetic regression task.

Runs on CPU in a few minutes (or a GPU when there is one). Everything gpupool needs is in the
marked lines; the rest is ordinary PyTorch.
"""

import os

import torch
from torch import nn

import gpupool.torch as gt  # gpupool: full training state (model, optimizer, RNGs...)
from gpupool import runtime  # gpupool: where to restore, when to save, when to stop

TOTAL_STEPS = int(os.environ.get("TOTAL_STEPS", "6000"))
BATCH = int(os.environ.get("BATCH", "256"))
HIDDEN = int(os.environ.get("HIDDEN", "256"))
SEED = 1234


def make_problem(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic data set: y = sin(W x) summed, with noise (same on every machine)."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(8192, 32, generator=g)
    w = torch.randn(32, 8, generator=g)
    y = torch.sin(x @ w).sum(dim=1, keepdim=True) + 0.05 * torch.randn(8192, 1, generator=g)
    return x.to(device), y.to(device)


def use_cpu_sensibly() -> None:
    """One torch thread unless told otherwise: this small model ran at 75 steps/s with one
    thread and 2.3 with two on a busy 2-core machine (threads oversubscribe the cores)."""
    threads = os.environ.get("TORCH_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"
    torch.set_num_threads(max(1, int(threads)))


def main() -> None:
    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        use_cpu_sensibly()
    x, y = make_problem(device)
    model = nn.Sequential(nn.Linear(32, HIDDEN), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL_STEPS)
    batches = torch.Generator().manual_seed(SEED + 1)  # which rows each step trains on
    state = dict(model=model, optimizer=optimizer, lr_scheduler=schedule,
                 generators={"batches": batches})

    session = runtime.session()
    step = 0
    if session.restore_dir:
        step = gt.load_training_state(session.restore_dir, **state).step
        print(f"resumed from step {step}", flush=True)

    loss = None  # a session resumed from the last step trains no further
    while step < TOTAL_STEPS:
        rows = torch.randint(0, x.shape[0], (BATCH,), generator=batches).to(device)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        session.report(step, total=TOTAL_STEPS, loss=loss.item())
        if session.checkpoint_due() or session.should_stop():
            with session.checkpoint(step) as folder:
                gt.save_training_state(folder, step=step, **state)
        if session.should_stop():
            session.yield_session(step)

    with session.checkpoint(step, final=True) as folder:
        gt.save_training_state(folder, step=step, **state)
    metrics = {"loss": loss.item()} if loss is not None else {}
    session.complete(step, **metrics)
    print(f"done: step {step}, {metrics}", flush=True)


if __name__ == "__main__":
    main()
