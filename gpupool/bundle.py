"""Pack an experiment's workdir, and gpupool's in-session runtime, for shipping to a session."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpupool.errors import SpecError

EXCLUDE_DIRS = {".git", "__pycache__", ".venv", "venv", "gpupool-session", ".ipynb_checkpoints",
                ".mypy_cache", ".pytest_cache", ".ruff_cache"}
MAX_BUNDLE_BYTES = 200 * 1024 * 1024
# What a session imports, under gpupool/: the session side whole (supervisor, snapshots, inputs,
# the contract), the public runtime, its clock and checkpoint format, the torch helpers, and the
# integrations (framework callbacks, imported only by scripts that use them). Packages go whole,
# so a module added to one ships without a change here.
RUNTIME_MODULES = ("__init__.py", "session", "runtime.py", "clock.py", "manifest.py", "errors.py",
                   "torch", "integrations")


def _workdir_files(workdir: Path, exclude: Iterable[str] = ()) -> Iterator[Path]:
    skip = {Path(workdir, folder) for folder in exclude}
    for root, dirs, files in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDE_DIRS and Path(root, d) not in skip)
        for name in sorted(files):
            path = Path(root) / name
            if not path.is_symlink() and not name.endswith(".pyc"):
                yield path


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0  # fixed mtime: same code, same bytes
    tar.addfile(info, io.BytesIO(data))


def pack_workdir(workdir: Path, target: Path, exclude: Iterable[str] = ()) -> str:
    """Write ``workdir`` as a reproducible .tar.gz at ``target``; returns its sha256.

    ``exclude``: folders relative to ``workdir`` left out, i.e. the checkpoint and output
    folders, which are the run's state: a stale ``last.pt`` must not ship to every session."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise SpecError("experiment", [("workdir", f"{workdir} is not a directory")])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    total = 0
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        for path in _workdir_files(workdir, exclude):
            data = path.read_bytes()
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                tmp.unlink(missing_ok=True)
                raise SpecError("experiment", [("workdir", (
                    f"{workdir} holds more than {MAX_BUNDLE_BYTES >> 20} MiB; keep data sets out "
                    "of the workdir and load them from the session"))])
            _add(tar, path.relative_to(workdir).as_posix(), data, path.stat().st_mode & 0o755)
    os.replace(tmp, target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def runtime_sources() -> dict[str, bytes]:
    """gpupool's in-session modules, as ``gpupool/<file>`` -> bytes (standard library only, but
    for ``torch`` and ``integrations``, which import their framework)."""
    here = Path(__file__).parent
    files = []
    for name in RUNTIME_MODULES:
        path = here / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return {f"gpupool/{f.relative_to(here).as_posix()}": f.read_bytes() for f in files}


def pack_runtime(target: Path) -> None:
    """A .tar.gz holding the in-session runtime, to put on ``sys.path`` in a remote session."""
    with tarfile.open(target, "w:gz") as tar:
        for name, data in sorted(runtime_sources().items()):
            _add(tar, name, data)
