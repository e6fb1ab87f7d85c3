"""Checkpoint publish throughput: sealing a checkpoint in a session and importing it into the
store (sha256 of every byte, manifest last), against a plain `shutil.copyfile` of the same
bytes measured in the same run; and a relay between two stores (`copy_from`) likewise.

    python bench/bench_checkpoint_publish.py             # 256 MB
    python bench/bench_checkpoint_publish.py --mb 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from _util import best_of, table

from gpupool import runtime
from gpupool.store import CheckpointStore

FILE = "model.pt"


def make_source(folder: Path, mb: int) -> Path:
    path = folder / "source.bin"
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as handle:
        for i in range(mb):
            handle.write(block[i % 256:] + block[: i % 256])  # no two MB alike
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpupool-bench-", dir=args.dir) as tmp:
        run(Path(tmp), args.mb, args.repeat)


def run(tmp: Path, mb: int, repeat: int) -> None:
    source = make_source(tmp, mb)
    session = runtime.Session({runtime.ENV_SESSION_DIR: str(tmp / "session"),
                               runtime.ENV_KEEP_LAST: "1000"}, install_sigterm=False)
    store = CheckpointStore(str(tmp / "store"))
    other = CheckpointStore(str(tmp / "relay"))
    counter = iter(range(1, 10_000))
    copies = iter(range(10_000))

    def plain_copy() -> None:
        shutil.copyfile(source, tmp / f"copy-{next(copies)}.bin")

    staged: list = []

    def publish() -> None:  # runtime: write (a copy), hash, fsync, manifest, rename
        step = next(counter)
        with session.checkpoint(step) as folder:
            shutil.copyfile(source, folder / FILE)
        staged.append(session.restore_manifest)

    def session_write_only() -> None:  # the same write without gpupool: the baseline's twin
        target = tmp / f"plain-{next(copies)}"
        target.mkdir()
        shutil.copyfile(source, target / FILE)

    def import_to_store() -> None:
        manifest = staged.pop()
        store.import_local(session.checkpoint_root / manifest.name, manifest)
        staged.insert(0, manifest)

    def relay() -> None:
        manifest = store.list()[0]
        other.import_local(store, manifest)
        other.delete(manifest.name)

    copy_s = best_of(repeat, plain_copy)
    write_s = best_of(repeat, session_write_only)
    publish_s = best_of(repeat, publish)
    import_s = best_of(repeat, import_to_store)
    relay_s = best_of(repeat, relay)
    end_to_end = publish_s + import_s
    speed = lambda s: f"{mb / s:.0f} MB/s"  # noqa: E731
    table(f"{mb} MB checkpoint, best of {repeat} (same disk, same run)", [
        ("shutil.copyfile (baseline)", speed(copy_s), "1.00"),
        ("session checkpoint(): write + hash + fsync + publish", speed(publish_s),
         f"{copy_s / publish_s:.2f}"),
        ("  of which the write itself (copyfile)", speed(write_s), f"{copy_s / write_s:.2f}"),
        ("store.import_local (sha256-verified copy)", speed(import_s), f"{copy_s / import_s:.2f}"),
        ("relay store -> store (copy_from, verified)", speed(relay_s), f"{copy_s / relay_s:.2f}"),
        ("publish + import, per copy made (2 copies)", speed(end_to_end / 2),
         f"{2 * copy_s / end_to_end:.2f}"),
    ], ("path", "throughput", "x copy speed"))


if __name__ == "__main__":
    main()
