"""A plain script without torch (it starts in milliseconds): a deterministic random walk that
checkpoints with pickle into ckpt/state.pkl and takes --resume; writes out/result.txt."""

import argparse
import os
import pickle
import random
import time

parser = argparse.ArgumentParser()
parser.add_argument("--resume")
args = parser.parse_args()
steps, save_every = int(os.environ["TOTAL_STEPS"]), int(os.environ["SAVE_EVERY"])
pause = float(os.environ["STEP_SECONDS"])
rng, value, step = random.Random(0), 0.0, 0
if args.resume:
    with open(args.resume, "rb") as handle:
        state = pickle.load(handle)
    rng.setstate(state["rng"])
    value, step = state["value"], state["step"]
os.makedirs("ckpt", exist_ok=True)
os.makedirs("out", exist_ok=True)
while step < steps:
    value = value * 0.999 + rng.random()
    step += 1
    time.sleep(pause)
    if step % save_every == 0:
        with open("ckpt/state.pkl", "wb") as handle:
            pickle.dump({"rng": rng.getstate(), "value": value, "step": step}, handle)
with open("out/result.txt", "w") as handle:
    handle.write(repr(value))
