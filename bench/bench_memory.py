"""Memory: peak resident memory (ru_maxrss) of a scheduler step (`gpupool daemon`'s
reconcile_once) with 1,000 active attempts, and of a relay of a large checkpoint between two
stores (streamed in fixed chunks, so constant in the checkpoint's size). Each is measured in a
fresh process against the same process that only imports and opens the pool (the baseline).

    python bench/bench_memory.py                  # 1000 attempts, 512 MB checkpoint
    python bench/bench_memory.py --mb 2048
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _util import peak_rss_mb, table

HERE = Path(__file__).resolve().parent


def child(task: str, folder: Path, size: int) -> None:
    """Runs in its own process; prints its peak RSS in MB."""
    import bench_scheduler_scale as scale

    from gpupool.manifest import FileEntry, Manifest, new_name, sha256_file
    from gpupool.scheduler import Scheduler
    from gpupool.store import CheckpointStore

    pool = scale.open_pool(folder / "pool")
    if task in ("reconcile", "idle"):
        scale.seed(pool, size, size)
        if task == "reconcile":
            Scheduler(pool).reconcile_once(scale.NOW + 1)
    elif task == "relay":
        data = folder / "source" / "model.bin"
        entry = FileEntry("model.bin", data.stat().st_size, sha256_file(data))
        manifest = Manifest(name=new_name(1), step=1, created=0.0, files=(entry,))
        source = CheckpointStore(str(folder / "a"))
        source.import_local(data.parent, manifest)
        CheckpointStore(str(folder / "b")).import_local(source, manifest)
    print(f"{peak_rss_mb():.1f}")


def measure(task: str, folder: Path, size: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", task, "--folder", str(folder),
                          "--size", str(size)], check=True, capture_output=True, text=True,
                         cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=1000)
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size for the relay")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder), args.size)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-") as tmp:
        idle = measure("idle", Path(tmp) / "idle", args.attempts)
        busy = measure("reconcile", Path(tmp) / "busy", args.attempts)
        rows.append((f"pool open, {args.attempts} attempts seeded (baseline)", f"{idle:.0f} MB", "1.00"))
        rows.append((f"+ reconcile_once over {args.attempts} active attempts", f"{busy:.0f} MB",
                     f"{busy / idle:.2f}"))
        for mb in sorted({64, args.mb}):
            folder = Path(tmp) / f"relay-{mb}"
            (folder / "source").mkdir(parents=True)
            with open(folder / "source" / "model.bin", "wb") as handle:
                block = os.urandom(1024 * 1024)
                for _ in range(mb):
                    handle.write(block)
            relay = measure("relay", folder, 0)
            rows.append((f"import + relay of a {mb} MB checkpoint", f"{relay:.0f} MB",
                         f"{relay / idle:.2f}"))
    table("peak resident memory (ru_maxrss), each in a fresh process", rows,
          ("process", "peak RSS", "x baseline"))


if __name__ == "__main__":
    main()
