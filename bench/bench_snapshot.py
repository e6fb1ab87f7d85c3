"""Snapshotting a Hugging Face-like checkpoint folder (gpupool.session.snapshot: copy + sha256 of every
byte, manifest last) against `cp -r` of the same folder in the same run, and a second snapshot
when nothing changed (goal: no byte read again, only a stat of each file).

    python bench/bench_snapshot.py              # 1024 MB
    python bench/bench_snapshot.py --mb 128     # a quick run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _util import best_of, table

from gpupool.session.snapshot import Folders, Snapshotter

# Shares of an HF Trainer checkpoint-N/ folder: weights, optimizer state (2x weights for Adam
# would dominate; kept smaller here), and the small files beside them.
LAYOUT = {"model.safetensors": 0.45, "optimizer.pt": 0.53, "scheduler.pt": 0.01, "rng_state.pth": 0.01}


def make_checkpoint(workdir: Path, mb: int) -> Path:
    folder = workdir / "output" / "checkpoint-500"
    folder.mkdir(parents=True)
    block = os.urandom(1024 * 1024)
    for name, share in LAYOUT.items():
        with open(folder / name, "wb") as handle:
            for i in range(max(1, int(mb * share))):
                handle.write(block[i % 256:] + block[: i % 256])
    for name in ("config.json", "trainer_state.json", "generation_config.json", "training_args.bin"):
        (folder / name).write_text(json.dumps({"name": name, "pad": "x" * 2000}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-", dir=args.dir) as tmp:
        work = Path(tmp) / "work"
        make_checkpoint(work, args.mb)
        total = sum(p.stat().st_size for p in (work / "output").rglob("*") if p.is_file())
        runs = iter(range(1000))

        def cp_r() -> None:
            target = Path(tmp) / f"cp-{next(runs)}"
            subprocess.run(["cp", "-r", str(work / "output"), str(target)], check=True)
            shutil.rmtree(target)

        def first_snapshot() -> Snapshotter:
            snapper = Snapshotter(Folders(work, "output", ()), Path(tmp) / f"session-{next(runs)}",
                                  info={}, keep_last=2)
            assert snapper.snapshot(trusted=True) is not None
            return snapper

        def cp_r_sync() -> None:
            target = Path(tmp) / f"cp-{next(runs)}"
            subprocess.run(["cp", "-r", str(work / "output"), str(target)], check=True)
            subprocess.run(["sync", "-f", str(target)], check=True)  # as durable as a snapshot
            shutil.rmtree(target)

        def sha256_only() -> None:
            for path in sorted((work / "output").rglob("*")):
                if path.is_file():
                    with open(path, "rb") as handle:
                        hashlib.file_digest(handle, "sha256")

        cp_seconds = best_of(args.repeat, cp_r)
        cp_sync_seconds = best_of(args.repeat, cp_r_sync)
        hash_seconds = best_of(args.repeat, sha256_only)
        snap_seconds = best_of(args.repeat, lambda: shutil.rmtree(first_snapshot().session_dir))
        snapper = first_snapshot()
        read_before = snapper.bytes_read
        started = time.perf_counter()
        state = work / "output" / "checkpoint-500" / "trainer_state.json"
        state.write_text(state.read_text().replace("x", "y", 1))  # one small file changes
        snapper.snapshot(trusted=True)
        again_seconds = time.perf_counter() - started
        reread = snapper.bytes_read - read_before
        read_before = snapper.bytes_read
        started = time.perf_counter()
        unchanged = snapper.snapshot(trusted=True)
        idle_seconds = time.perf_counter() - started
        idle_reread = snapper.bytes_read - read_before
    mb = total / 2**20
    table(f"snapshot of a {mb:.0f} MB HF-like checkpoint folder (best of {args.repeat})", [
        ("cp -r", f"{cp_seconds:.3f}", f"{mb / cp_seconds:.0f}", "1.00"),
        ("cp -r, then sync", f"{cp_sync_seconds:.3f}", f"{mb / cp_sync_seconds:.0f}",
         f"{cp_seconds / cp_sync_seconds:.2f}"),
        ("sha256 alone, one core (the floor)", f"{hash_seconds:.3f}", f"{mb / hash_seconds:.0f}",
         f"{cp_seconds / hash_seconds:.2f}"),
        ("first snapshot (copy + sha256)", f"{snap_seconds:.3f}", f"{mb / snap_seconds:.0f}",
         f"{cp_seconds / snap_seconds:.2f}"),
        ("snapshot after 1 small file changed", f"{again_seconds:.4f}", "-", f"re-read {reread} B"),
        ("snapshot with nothing changed", f"{idle_seconds:.4f}", "-",
         f"re-read {idle_reread} B, " + ("nothing published" if unchanged is None else "published!")),
    ], ("what", "seconds", "MB/s", "speed vs cp -r (goal >= 0.70)"))


if __name__ == "__main__":
    main()
