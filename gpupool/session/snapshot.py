"""Checkpoint and output folders of a script that does not use ``gpupool.runtime``.

Standard library only: this runs inside every session, in the supervisor (``gpupool.session.bootstrap``).
The experiment file names a checkpoint folder (``checkpoint.path``) and output folders
(``outputs``), relative to the workdir. A *snapshot* is a regular gpupool checkpoint
(``ckpt-*`` with a manifest written last, see ``gpupool.manifest``) whose files are paths
relative to the workdir, e.g. ``checkpoints/last.pt`` and ``runs/events.out...``. It is published
into the session's ``checkpoints/`` folder, where the runtime's own checkpoints go, so every
provider collects it the way it already collects those. Restoring one puts every file back in place,
so the next session finds its checkpoint folder, and its outputs (TensorBoard curves go on).

Only a consistent state is published: the checkpoint folder must be quiet (nothing modified in
the last ``quiet`` seconds, unless the trainer asked for the snapshot or exited cleanly) and two
scans, before and after the copy, must agree on every file's size, mtime and inode; otherwise
the previous snapshot's copy of the checkpoint folder is kept. Output files are taken one by one,
each only if it did not change while it was copied. A file unchanged since the last snapshot
(same size, mtime, ctime, inode) is neither read nor hashed again: it is hard-linked from the
previous snapshot (our own immutable copy), or copied from it where links are not possible.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import stat as stat_module
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpupool.errors import CheckpointError
from gpupool.manifest import (
    CHUNK,
    FileEntry,
    Manifest,
    check_relative_path,
    list_local,
    new_name,
    read_local,
    seal,
)
from gpupool.session import contract

RESUME = re.compile(r"\{\{\s*resume\s*:(?P<text>.*?)\}\}", re.DOTALL)
RESUME_OPEN = re.compile(r"\{\{\s*resume\b")
COPY_THREADS = 4  # files copied at once: a checkpoint folder holds a few large files
DEFAULT_QUIET = 1.0  # seconds the checkpoint folder must be unmodified before a snapshot

Stat = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


# -- the `{{resume: ...}}` substitution in `run` -------------------------------------------

def resume_problems(command: str, checkpoint_path: str | None) -> list[str]:
    """What is wrong with the ``{{resume: ...}}`` parts of ``command`` (empty: nothing)."""
    opened = len(RESUME_OPEN.findall(command))
    found = list(RESUME.finditer(command))
    if opened != len(found):
        return ["has a '{{resume' without its closing '}}' (write {{resume: --resume PATH}})"]
    if found and checkpoint_path is None:
        return ["uses {{resume: ...}} but the experiment declares no checkpoint.path"]
    if any(not m.group("text").strip() for m in found):
        return ["has an empty {{resume: }}; put the arguments to pass when resuming inside"]
    return []


def substitute_resume(command: str, workdir: Path, checkpoint_path: str | None, resumed: bool) -> str:
    """``command`` with each ``{{resume: TEXT}}`` replaced by TEXT when a checkpoint was restored
    and every path TEXT names inside the checkpoint folder exists, and by nothing otherwise."""
    def _replace(match: re.Match[str]) -> str:
        text = match.group("text").strip()
        if resumed and checkpoint_path is not None and _named_paths_exist(text, workdir, checkpoint_path):
            return text
        return ""

    return RESUME.sub(_replace, command)


def _named_paths_exist(text: str, workdir: Path, checkpoint_path: str) -> bool:
    folder = (workdir / checkpoint_path).resolve()
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    for word in words:
        candidate = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
        path = (workdir / candidate).resolve() if candidate else folder.parent
        if (path == folder or folder in path.parents) and not path.exists():
            return False
    return True


# -- which folders --------------------------------------------------------------------------

@dataclass(frozen=True)
class Folders:
    """The declared folders of one session, relative to ``workdir``."""

    workdir: Path
    checkpoint: str | None
    outputs: tuple[str, ...]

    @classmethod
    def from_env(cls, env: dict[str, str], workdir: Path) -> Folders | None:
        """From ``GPUPOOL_CHECKPOINT_PATH`` and ``GPUPOOL_OUTPUTS`` (a JSON list); None if neither."""
        checkpoint = env.get(contract.ENV_CHECKPOINT_PATH) or None
        outputs = tuple(json.loads(env.get(contract.ENV_OUTPUTS) or "[]"))
        if checkpoint is None and not outputs:
            return None
        return cls(Path(workdir), checkpoint, outputs)

    def all(self) -> tuple[str, ...]:
        return ((self.checkpoint,) if self.checkpoint else ()) + self.outputs

    def in_checkpoint(self, rel: str) -> bool:
        folder = self.checkpoint
        return folder is not None and (rel == folder or rel.startswith(folder + "/"))


def scan(folders: Folders) -> dict[str, tuple[Stat, Path]]:
    """Every regular file under the declared folders: workdir-relative path -> (stat, path).
    Symlinks are left out (a snapshot holds regular files only)."""
    found: dict[str, tuple[Stat, Path]] = {}
    for name in folders.all():
        top = folders.workdir / name
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
            for file in sorted(files):
                path = Path(root) / file
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    continue  # removed while scanning: the next scan will not agree
                if not stat_module.S_ISREG(info.st_mode):
                    continue
                rel = path.relative_to(folders.workdir).as_posix()
                found[rel] = (_stat_key(info), path)
    return found


def _stat_key(info: os.stat_result) -> Stat:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


# -- restoring ------------------------------------------------------------------------------

@dataclass
class Known:
    """A file whose content is known: its stat in the workdir, its hash, and our own immutable
    copy of it (to link from)."""

    stat: Stat
    sha256: str
    size: int
    source: Path


def restore_into(folders: Folders, restore_dir: Path) -> dict[str, Known]:
    """Copy a snapshot's files into place under the workdir (mtimes kept); returns them as
    known files, so the first snapshot does not hash them again. Runtime checkpoints (not
    snapshots) are left alone: the script reads them from ``GPUPOOL_RESTORE_DIR``."""
    manifest = read_local(restore_dir)
    if not manifest.metadata.get("snapshot"):
        return {}
    known: dict[str, Known] = {}
    for entry in manifest.files:
        check_relative_path(entry.path)
        source = restore_dir / entry.path
        target = folders.workdir / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_dir():
            raise ValueError(f"cannot restore {entry.path}: the workdir has a link or folder there")
        shutil.copy2(source, target)
        known[entry.path] = Known(_stat_key(target.stat()), entry.sha256, entry.size, source)
    return known


def restored_checkpoint(folders: Folders, known: dict[str, Known]) -> bool:
    """Whether anything was restored into the checkpoint folder (there is something to resume)."""
    return any(folders.in_checkpoint(rel) for rel in known)


# -- snapshotting ---------------------------------------------------------------------------

class RuntimeCheckpoints(ValueError):
    """The script writes checkpoints through gpupool.runtime: folder snapshots would hide them."""


class Snapshotter:
    """Publishes consistent snapshots of the declared folders into ``root`` (the session's
    ``checkpoints`` folder). Not thread-safe: one caller at a time (``Background`` serialises)."""

    def __init__(self, folders: Folders, session_dir: Path, *, info: dict[str, str], keep_last: int,
                 known: dict[str, Known] | None = None, quiet: float = DEFAULT_QUIET,
                 start_step: int = 0, reported_step: Callable[[], int | None] = lambda: None,
                 clock: Callable[[], float] = time.time):
        self.folders, self.session_dir = folders, Path(session_dir)
        self.root = self.session_dir / contract.CHECKPOINTS_DIR
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.info, self.keep_last, self.quiet, self.clock = info, keep_last, quiet, clock
        # Files whose content we hold an immutable copy of (restored, or last published), and
        # the files of the state we hold: the restored checkpoint, then each snapshot.
        self.known: dict[str, Known] = dict(known or {})
        self.published = {rel: FileEntry(rel, k.size, k.sha256) for rel, k in self.known.items()}
        self._fresh: dict[str, Known] = {}  # hashed in the snapshot being taken
        self.step = start_step
        self.reported_step = reported_step
        self.bytes_read = 0  # bytes copied from the workdir (for the bench and tests)

    def snapshot(self, *, trusted: bool = False, final: bool = False, quiet_until: float | None = None
                 ) -> Manifest | None:
        """Publish a snapshot if anything changed; returns its manifest (None: nothing new).

        ``trusted``: the trainer finished writing (it asked, or exited cleanly), so the quiet
        period is not waited for. ``quiet_until``: the moment the folder had to be quiet before
        (default now; the trainer's end for a snapshot after it was killed).
        """
        if self._runtime_checkpoints():
            # A snapshot would be newer than the script's own runtime checkpoint and be restored
            # in its place, without the training state: the runtime's checkpoints rule alone.
            raise RuntimeCheckpoints("this script publishes gpupool.runtime checkpoints; its "
                                     "checkpoint.path and outputs are not snapshotted")
        before = scan(self.folders)
        checkpoint_ok = trusted or self._quiet(before, self.clock() if quiet_until is None else quiet_until)
        staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=self.session_dir))
        self._fresh = {}
        try:
            entries = self._fill(staging, before, checkpoint_ok)
            if entries == self.published:
                self._remember_touched()
                return None
            return self._publish(staging, entries, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _runtime_checkpoints(self) -> bool:
        return any(not m.metadata.get("snapshot") for m in list_local(self.root))

    def _quiet(self, files: dict[str, tuple[Stat, Path]], until: float) -> bool:
        newest = max((stat[1] for rel, (stat, _) in files.items() if self.folders.in_checkpoint(rel)),
                     default=0)
        return newest / 1e9 <= until - self.quiet

    def _fill(self, staging: Path, before: dict[str, tuple[Stat, Path]], checkpoint_ok: bool
              ) -> dict[str, FileEntry]:
        entries: dict[str, FileEntry] = {}
        to_copy: list[tuple[str, Stat, Path]] = []
        for rel, (stat, path) in before.items():
            if self.folders.in_checkpoint(rel) and not checkpoint_ok:
                continue
            reused = self._reuse(rel, stat, staging / rel)
            if reused is not None:
                entries[rel] = reused
            else:
                to_copy.append((rel, stat, path))
        with ThreadPoolExecutor(COPY_THREADS) as pool:  # large files copy and hash side by side
            copied = list(pool.map(lambda job: self._copy(job[1], job[2], staging / job[0]), to_copy))
        for (rel, _, _), known in zip(to_copy, copied, strict=True):
            if known is not None:
                entries[rel] = FileEntry(rel, known.size, known.sha256)
                self._fresh[rel] = known
                self.bytes_read += known.size
            elif not self.folders.in_checkpoint(rel):
                self._keep_previous(rel, staging, entries)  # an output being written: last version
        self._settle_checkpoint(staging, entries, before, checkpoint_ok)
        return entries

    def _settle_checkpoint(self, staging: Path, entries: dict[str, FileEntry],
                           before: dict[str, tuple[Stat, Path]], checkpoint_ok: bool) -> None:
        """Keep the checkpoint folder's files only if every one was copied and a second scan
        agrees with the first; otherwise put the previous consistent copy in their place."""
        first = {r: s for r, (s, _) in before.items() if self.folders.in_checkpoint(r)}
        second = {r: s for r, (s, _) in scan(self.folders).items() if self.folders.in_checkpoint(r)}
        copied = [r for r in entries if self.folders.in_checkpoint(r)]
        if checkpoint_ok and first == second and len(copied) == len(first):
            return
        for rel in copied:
            (staging / rel).unlink()
            del entries[rel]
        for rel in self.published:
            if self.folders.in_checkpoint(rel):
                self._keep_previous(rel, staging, entries)

    def _reuse(self, rel: str, stat: Stat, target: Path) -> FileEntry | None:
        """An unchanged file: linked from our own copy, neither read nor hashed again."""
        target.parent.mkdir(parents=True, exist_ok=True)
        known = self.known.get(rel)
        if known is not None and known.stat == stat and _link_or_copy(known.source, target):
            return FileEntry(rel, known.size, known.sha256)
        return None

    def _copy(self, stat: Stat, path: Path, target: Path) -> Known | None:
        """Copy and hash a file; None if it vanished or changed while it was copied."""
        try:
            digest, size = copy_hashed(path, target)
            now = _stat_key(path.lstat())
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            return None
        if now != stat or size != stat[0]:
            target.unlink()
            return None
        return Known(stat, digest, size, target)

    def _keep_previous(self, rel: str, staging: Path, entries: dict[str, FileEntry]) -> None:
        previous = self.published.get(rel)
        known = self.known.get(rel)
        if previous is None or known is None or known.sha256 != previous.sha256:
            return
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if _link_or_copy(known.source, target):
            entries[rel] = previous

    def _remember_touched(self) -> None:
        """Files rewritten with the same bytes (a new mtime): our published copy stands for them,
        so the next snapshot does not read them again."""
        for rel, fresh in self._fresh.items():
            known = self.known.get(rel)
            if known is not None and known.sha256 == fresh.sha256:
                known.stat = fresh.stat

    def _publish(self, staging: Path, entries: dict[str, FileEntry], final: bool) -> Manifest:
        started = time.monotonic()
        reported = self.reported_step()
        self.step = max(self.step, reported) if reported is not None else self.step + 1
        name = new_name(self.step)
        manifest = Manifest(
            name=name, step=self.step, created=time.time(), files=tuple(entries[k] for k in sorted(entries)),
            final=final, metadata={"snapshot": True, "checkpoint_path": self.folders.checkpoint,
                                   "outputs": list(self.folders.outputs),
                                   "save_seconds": round(time.monotonic() - started, 4)},
            **self.info,
        )
        seal(staging, manifest, self.root)
        self.published = dict(entries)
        self.known.update(self._fresh)
        for rel in list(self.known):  # our immutable copies now live in the published folder
            if rel in entries:
                self.known[rel].source = self.root / name / rel
            else:
                del self.known[rel]
        self._prune()
        return manifest

    def _prune(self) -> None:
        for old in list_local(self.root)[self.keep_last:]:
            shutil.rmtree(self.root / old.name, ignore_errors=True)


def copy_hashed(source: Path, target: Path) -> tuple[str, int]:
    """Copy ``source`` to ``target`` (durably) and return (sha256, bytes hashed). The kernel
    copies (``copy_file_range``/``sendfile`` through ``shutil.copyfile``) while a thread hashes
    the source from the page cache; the caller checks the file did not change meanwhile."""
    result: dict[str, Any] = {}

    def _hash() -> None:
        digest, size, buffer = hashlib.sha256(), 0, bytearray(CHUNK)
        view = memoryview(buffer)
        with open(source, "rb", buffering=0) as reader:
            while count := reader.readinto(buffer):
                digest.update(view[:count])  # releases the GIL: runs beside the copy
                size += count
        result["sha256"], result["size"] = digest.hexdigest(), size

    hasher = threading.Thread(target=_hash, name="gpupool-hash")
    hasher.start()
    try:
        shutil.copyfile(source, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    finally:
        hasher.join()
    if "sha256" not in result:
        raise FileNotFoundError(f"{source} could not be read")
    return result["sha256"], result["size"]


def _link_or_copy(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
        return True
    except FileNotFoundError:
        return False  # our copy was pruned meanwhile: read the file again
    except OSError:
        try:
            shutil.copyfile(source, target)  # another filesystem: a copy, still not hashed again
            return True
        except OSError:
            return False


# -- in the supervisor: when to snapshot ----------------------------------------------------

class Background:
    """A thread that snapshots at the checkpoint interval and whenever the trainer asks
    (``Session.request_snapshot()`` replaces a request file); ``finish`` takes the last one."""

    def __init__(self, snapshotter: Snapshotter, interval: float, request_file: Path,
                 log: Callable[[str], None] = print, poll: float = 0.2):
        self.snapshotter, self.interval, self.request_file = snapshotter, interval, request_file
        self.log, self.poll = log, poll
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._warned = False
        self._seen = _request_key(request_file)
        self._thread = threading.Thread(target=self._run, name="gpupool-snapshot", daemon=True)

    def start(self) -> Background:
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.poll):
            asked = _request_key(self.request_file)
            if asked != self._seen:
                self._seen = asked
                self._take(trusted=True)
                last = time.monotonic()
            elif time.monotonic() - last >= self.interval:
                self._take(trusted=False)
                last = time.monotonic()

    def _take(self, **options: Any) -> Manifest | None:
        with self._lock:
            try:
                manifest = self.snapshotter.snapshot(**options)
            except RuntimeCheckpoints as err:
                if not self._warned:
                    self.log(f"[gpupool] {err}")
                    self._warned = True
                return None
            except (OSError, ValueError, CheckpointError) as err:  # keep training; the next try may succeed
                self.log(f"[gpupool] snapshot failed, will retry: {err}")
                return None
        if manifest is not None:
            self.log(f"[gpupool] snapshot {manifest.name}: {len(manifest.files)} file(s), "
                     f"{manifest.total_bytes} bytes")
        return manifest

    def finish(self, returncode: int, ended: float, clean_codes: tuple[int, ...]) -> Manifest | None:
        """Stop the thread and take the last snapshot. After a clean exit the folder is as the
        trainer left it; after a kill it is taken only if it was quiet before the end."""
        self._stop.set()
        self._thread.join()
        clean = returncode in clean_codes
        return self._take(trusted=clean, final=returncode == 0, quiet_until=ended)


def _request_key(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns)


def last_reported_step(session_dir: Path) -> int | None:
    """The newest step the script reported through the runtime (events.jsonl), if any."""
    step = contract.last_event(session_dir).get("step")
    return step if isinstance(step, int) else None


def normalise(folder: str) -> str:
    """``./checkpoints/`` -> ``checkpoints``; what the experiment file's folders are compared by."""
    return posixpath.normpath(folder.strip().replace("\\", "/"))
