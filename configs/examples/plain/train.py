"""A plain PyTorch training script that knows nothing of gpupool.

It saves ``checkpoints/last.pt`` with ``torch.save`` every SAVE_EVERY steps, resumes when given
``--resume PATH``, logs its loss to ``runs/`` and writes the trained model to ``final/model.pt``.
Only its experiment file (experiment.yaml) makes it survive session ends: gpupool restores
``checkpoints/`` in every session, passes ``--resume`` only when there is something to resume,
and keeps ``final/`` and ``runs/`` in the store (``gpupool pull ID``).
"""

import argparse
import os
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--resume", help="a checkpoint written by this script")
parser.add_argument("--steps", type=int, default=int(os.environ.get("TOTAL_STEPS", "3000")))
parser.add_argument("--save-every", type=int, default=int(os.environ.get("SAVE_EVERY", "500")))
args = parser.parse_args()
pause = float(os.environ.get("STEP_SECONDS", "0"))  # to make a tiny model as slow as a real one

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = torch.Generator().manual_seed(1)
target = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))
step = 0

if args.resume:
    state = torch.load(args.resume, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data.set_state(state["data_rng"])
    step = state["step"]
    print(f"resumed from {args.resume} at step {step}", flush=True)

os.makedirs("checkpoints", exist_ok=True)
os.makedirs("runs", exist_ok=True)
log = open(f"runs/loss-from-step-{step}.csv", "a")  # one file per session: curves are merged
while step < args.steps:
    x = torch.randn(32, 16, generator=data)
    loss = ((model(x) - x @ target) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    if pause:
        time.sleep(pause)
    if step % 50 == 0:
        log.write(f"{step},{loss.item():.6f}\n")
        log.flush()
    if step % args.save_every == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "data_rng": data.get_state(), "step": step}, "checkpoints/last.pt")

os.makedirs("final", exist_ok=True)
torch.save(model.state_dict(), "final/model.pt")
print(f"done at step {step}; final/model.pt written", flush=True)
