"""An experiment's data (``inputs:``): checking sources, hashing content, fetching URLs.

Where an input appears in a session, per provider (the path is also in ``GPUPOOL_INPUT_<NAME>``,
the name upper-cased):

* local: a local input is used in place (its own path); a url input is fetched once into
  ``<data_dir>/inputs/url/`` and verified against its sha256.
* kaggle: a local input is a version of the private dataset of its name (a new version only
  for a new content, see ``providers/kaggle/inputs.py``), mounted read-only and verified;
  a kaggle input is attached as a dataset source (read-only under ``/kaggle/input``); a url
  input is fetched in the kernel and verified.
* colab: a local input is a Drive folder per content (``providers/colab/inputs.py``); it and
  a drive input are copied onto the VM through the Drive API, verified and made read-only; a
  url input is fetched in the notebook and verified.

An input whose source lives at another provider (a Kaggle dataset for a local or Colab session,
a Drive file or folder for a local or Kaggle session) is downloaded once by the adapter that owns
its kind (``Provider.download_input``, found through ``InputSources``) into
``<data_dir>/inputs/<kind>/``, then used in place by the local provider and shipped like a local
input's content to Colab (a Drive folder) or Kaggle (a private dataset).

Content hashes are sha256 over every file's relative path, size and sha256. The per-file
hashes are cached by absolute path, size and mtime, so an unchanged input is never re-read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gpupool.errors import CredentialsError, InputUnavailable, SpecError
from gpupool.session.contract import input_env_name

if TYPE_CHECKING:
    from gpupool.provider import Provider
    from gpupool.spec import ExperimentSpec, InputSpec

PROGRESS_BYTES = 8 * 1024 * 1024  # show progress for anything larger
CHUNK = 1024 * 1024

OpenUrl = Callable[[str], IO[bytes]]
Problem = tuple[tuple[Any, ...], str]  # (location in the experiment file, message)


# -- checks that need no provider ---------------------------------------------------------

def input_problems(spec: ExperimentSpec) -> list[Problem]:
    """What is wrong with ``spec.inputs`` on this machine: missing or unreadable local paths,
    two inputs at one path (the same source, one folder inside another, or names that differ
    only in case)."""
    problems: list[Problem] = []
    for name, item in spec.inputs.items():
        problems += local_problems(name, item)
    problems += _clashes(spec.inputs)
    return problems


def local_problems(name: str, item: InputSpec) -> list[Problem]:
    """A local input that does not exist, or holds a file or folder this user cannot read
    (it would fail in every session, after placement, with the script's PermissionError)."""
    if item.local is None:
        return []
    where = ("inputs", name, "local")
    if not item.local.exists():
        return [(where, f"{item.local} does not exist")]
    unreadable = first_unreadable(item.local)
    if unreadable is not None:
        return [(where, f"{unreadable} is not readable by this user (check its permissions)")]
    return []


def first_unreadable(root: Path) -> Path | None:
    """The first file or folder under ``root`` (itself included) this process cannot read:
    folders must be listable, files openable. Only ``root`` itself is opened; the files
    below are asked of ``os.access`` (opening each of many files would cost seconds)."""
    if not root.is_dir():
        try:
            with open(root, "rb"):
                return None
        except OSError:
            return root
    failed: list[Path] = []
    if not os.access(root, os.R_OK | os.X_OK):
        return root
    for folder, dirs, names in os.walk(root, onerror=lambda err: failed.append(Path(err.filename))):
        dirs.sort()
        for entry in sorted(names):
            path = Path(folder) / entry
            if not path.is_symlink() and not os.access(path, os.R_OK):
                return path
        if failed:
            return failed[0]
    return failed[0] if failed else None


def _clashes(inputs: dict[str, InputSpec]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for name in inputs:
        other = seen.get(input_env_name(name))
        if other is not None:
            problems.append((("inputs", name), f"same session path and variable as {other!r} "
                                               f"({input_env_name(name)}); rename one"))
        seen[input_env_name(name)] = name
    names = list(inputs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _overlap(inputs[first], inputs[second]):
                problems.append((("inputs", second), f"is at the same place as input {first!r} "
                                                     f"({inputs[second].source}); give it once"))
    return problems


def _overlap(a: InputSpec, b: InputSpec) -> bool:
    if a.kind != b.kind:
        return False
    if a.local is not None and b.local is not None:
        return a.local == b.local or a.local in b.local.parents or b.local in a.local.parents
    return a.source.split("@")[0] == b.source.split("@")[0]


def raise_problems(problems: list[Problem], source: Path | None) -> None:
    """Raise SpecError (exit 2) naming each problem's field, with its line when the experiment
    file is known."""
    if not problems:
        return
    from gpupool.yamlfile import locate

    text = source.read_text(encoding="utf-8") if source is not None and source.exists() else ""
    raise SpecError(str(source or "experiment"),
                    [(locate(text, loc) if text else ".".join(map(str, loc)), what)
                     for loc, what in problems])


# -- inputs whose source lives at another provider -------------------------------------------

OwnerOf = Callable[[str], "Provider | None"]  # input kind -> the adapter that downloads it


class InputSources:
    """Downloads, for any placing adapter, inputs whose source lives at another provider.

    ``owner_of(kind)`` is the pool's lookup of the adapter whose ``input_sources`` holds the
    kind (found through the provider registry: the core names no provider). Each source gets
    its own cache folder ``<cache_dir>/<kind>/<source key>``, which its owner fills."""

    def __init__(self, cache_dir: Path, owner_of: OwnerOf):
        self.cache_dir, self.owner_of = Path(cache_dir), owner_of

    def fetch(self, name: str, item: InputSpec) -> Path:
        """The file or folder holding input ``name``'s content on this machine, downloaded
        now only when the cache lacks its current version.

        Raises InputUnavailable when no adapter downloads the kind, the source is gone or
        unreadable, or the owner's credentials do not work (the attempt fails with the reason
        instead of waiting for a provider); ProviderError when the owning service fails."""
        owner = self.owner_of(item.kind)
        if owner is None:
            raise InputUnavailable("inputs", f"input {name!r}: no configured provider downloads "
                                             f"{item.kind} inputs")
        try:
            return owner.download_input(item, self.cache_dir / item.kind / source_key(item.source))
        except (InputUnavailable, CredentialsError) as err:  # gone, or no account to read it:
            reason = str(err).removeprefix(f"{err.provider}: ")  # another place cannot help
            raise InputUnavailable(err.provider, f"input {name!r}: {reason}") from None

    def check(self, spec: ExperimentSpec, checked: set[str]) -> list[Problem]:
        """Problems with every input that some adapter downloads, asked of that adapter's own
        ``check_inputs`` (existence, readability with its account), except adapters in
        ``checked`` (they checked the whole experiment already)."""
        problems: list[Problem] = []
        for kind in sorted({item.kind for item in spec.inputs.values()}):
            owned = {n: i for n, i in spec.inputs.items() if i.kind == kind}
            if kind in ("local", "url"):
                continue
            owner = self.owner_of(kind)
            if owner is None:
                problems += [(("inputs", n, kind), f"no configured provider can read {kind} "
                                                   "inputs (is its adapter installed?)") for n in owned]
            elif owner.name not in checked:
                problems += owner.check_inputs(spec.model_copy(update={"inputs": owned}))
        return problems


def source_key(source: str) -> str:
    """A folder name for one source (readable, and unique through a short hash). A version
    (``@N``) is left out: the versions of one source share its folder, which the owning
    adapter keeps apart by version."""
    source = source.partition("@")[0]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", source)[:60]
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


# -- content hashing ------------------------------------------------------------------------

@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, posix
    size: int  # bytes
    sha256: str


@dataclass(frozen=True)
class Content:
    """A local input's files and their hashes; ``sha256`` names the whole content."""

    root: Path
    is_dir: bool
    files: tuple[FileEntry, ...]
    sha256: str

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    def source_of(self, entry: FileEntry) -> Path:
        return self.root / entry.path if self.is_dir else self.root

    def listing(self) -> dict[str, Any]:
        """What CONTENT_FILE holds: the session verifies every byte it unpacks against it."""
        return {"sha256": self.sha256, "is_dir": self.is_dir,
                "files": [[e.path, e.size, e.sha256] for e in self.files]}


class HashCache:
    """sha256 of files by absolute path, trusted while size and mtime (ns) are unchanged.

    Kept as one JSON file (written atomically); an unreadable cache is treated as empty."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hashed_bytes = 0  # bytes actually read by this object (0 when all cached)
        try:
            self._entries: dict[str, list[Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def lookup(self, path: Path, stat: os.stat_result) -> str | None:
        entry = self._entries.get(str(path))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return str(entry[2])
        return None

    def store(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        self._entries[str(path)] = [stat.st_size, stat.st_mtime_ns, sha256]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.path)


def foreign_content(foreign: InputSources | None, provider: str, name: str, item: InputSpec,
                    cache: HashCache) -> Content:
    """The content of input ``name`` whose source lives at another provider, downloaded into
    this machine's cache by ``foreign`` and hashed (only files the cache does not know).

    Raises InputUnavailable when the placing ``provider`` was given no downloader (a pool
    always gives one; a bare adapter in a test may not), or as ``InputSources.fetch`` does."""
    if foreign is None:
        raise InputUnavailable(provider, f"input {name!r}: {item.kind} inputs need a pool "
                                         "that can ask the provider holding them")
    return hash_content(foreign.fetch(name, item), cache)


def hash_content(root: Path, cache: HashCache) -> Content:
    """Hash the file or folder at ``root``, reading only files the cache does not know.

    Raises InputUnavailable when ``root`` is gone or unreadable."""
    root = Path(root).resolve()
    try:
        listing = list(_walk(root))
    except OSError as err:
        raise InputUnavailable("inputs", f"cannot read {root}: {err}") from None
    stale = [(rel, path, st) for rel, path, st in listing if cache.lookup(path, st) is None]
    with progress_bar(f"hashing {root.name}", sum(st.st_size for _, _, st in stale)) as advance:
        for _rel, path, st in stale:
            cache.store(path, st, _sha256_file(path, advance))
            cache.hashed_bytes += st.st_size
    files = tuple(FileEntry(rel, st.st_size, cache.lookup(path, st) or "") for rel, path, st in listing)
    if stale:
        cache.save()
    digest = hashlib.sha256()
    for entry in files:
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return Content(root, root.is_dir(), files, digest.hexdigest())


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    if not root.is_dir():
        yield root.name, root, root.stat()
        return
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if not path.is_symlink():
                yield path.relative_to(root).as_posix(), path, path.stat()


def _sha256_file(path: Path, advance: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (size, rate, ETA) on stderr for more than PROGRESS_BYTES; yields
    ``advance(bytes)``. rich is imported only when a bar is shown (not when stderr is a file)."""
    if total <= PROGRESS_BYTES or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


# -- packing for upload ---------------------------------------------------------------------

def pack_content(content: Content, target: Path) -> Path:
    """An uncompressed tar of the input's files (relative paths; a single file by its name);
    every file is re-hashed while it is packed, so a file changed since hashing is refused,
    not shipped. Its listing (``Content.listing()``) travels beside it as CONTENT_FILE.

    Raises InputUnavailable when a file changed or vanished meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar, progress_bar(f"packing {content.root.name}",
                                                     content.size) as advance:
        for entry in content.files:
            _add_file(tar, content, entry, advance)
    os.replace(tmp, target)
    return target


def _add_file(tar: tarfile.TarFile, content: Content, entry: FileEntry,
              advance: Callable[[int], None]) -> None:
    path = content.source_of(entry)
    info = tarfile.TarInfo(entry.path)
    info.size, info.mode, info.mtime = entry.size, 0o444, 0
    try:
        with open(path, "rb") as handle:
            reader = _HashingReader(handle, advance)
            tar.addfile(info, reader)
    except (OSError, tarfile.TarError) as err:
        raise InputUnavailable("inputs", f"cannot read {path}: {err}") from None
    if reader.digest.hexdigest() != entry.sha256:
        raise InputUnavailable("inputs", f"{path} changed while it was being packed; run again")


class _HashingReader(io.RawIOBase):
    def __init__(self, handle: IO[bytes], advance: Callable[[int], None]):
        self.handle, self.advance, self.digest = handle, advance, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.advance(len(data))
        return data


# -- caches of downloaded inputs ----------------------------------------------------------------
#
# A download kept for later attempts (a url's file, a Kaggle dataset version, a Drive folder)
# is sealed: its files are made read-only (0444) and recorded with size, mtime, ctime and
# sha256. Before each use every file's stat is compared with the record; any difference is
# re-hashed, and a content that no longer matches makes the caller download it again. The
# ctime is kept because writing a file and putting its mtime back (touch -d) still moves it.

Sealed = dict[str, list[Any]]  # relative path -> [size (bytes), mtime (ns), sha256, ctime (ns)]


def seal(root: Path) -> Sealed:
    """Make every file under ``root`` (or ``root`` itself) read-only (0444) and record it."""
    sealed: Sealed = {}
    for rel, path, _st in _walk(root):
        path.chmod(0o444)
        sealed[rel] = _stamp(path, _sha256_file(path, lambda n: None))
    return sealed


def _stamp(path: Path, sha256: str) -> list[Any]:
    return _stamp_of(path.stat(), sha256)


def still_sealed(root: Path, sealed: Sealed | None) -> bool:
    """Whether ``root`` holds exactly the files of ``sealed`` with their content: files whose
    size or mtime changed since are re-hashed (and their record refreshed when they match)."""
    if not sealed or not root.exists():
        return False
    try:
        found = {rel: (path, st) for rel, path, st in _walk(root)}
    except OSError:
        return False
    if set(found) != set(sealed):
        return False
    for rel, (path, st) in found.items():
        if len(sealed[rel]) == 4 and _stamp_of(st, sealed[rel][2]) == sealed[rel]:
            continue
        size, _mtime_ns, sha256 = sealed[rel][:3]
        try:
            if st.st_size != size or _sha256_file(path, lambda n: None) != sha256:
                return False
            path.chmod(0o444)
            sealed[rel] = _stamp(path, sha256)
        except OSError:
            return False
    return True


def _stamp_of(st: os.stat_result, sha256: str) -> list[Any]:
    return [st.st_size, st.st_mtime_ns, sha256, st.st_ctime_ns]


def drop_cached(*paths: Path) -> None:
    """Remove cached downloads (read-only files inside writable folders can be removed)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def reuse_sealed(folder: Path, done: Path) -> bool:
    """Whether the download in ``folder`` whose marker ``done`` (``write_sealed``) was written
    last is complete and unchanged; when it is not, both are removed (download it again)."""
    marker = _read_record(done)
    if still_sealed(folder, marker.get("sealed")):
        _write_record(done, marker)  # re-hashed files' new stamps: not re-read next time
        return True
    drop_cached(folder, done)
    return False


def write_sealed(done: Path, facts: dict[str, Any], folder: Path) -> None:
    """Seal the finished download in ``folder`` and write its marker ``done`` (last)."""
    _write_record(done, {**facts, "sealed": seal(folder)})


# -- urls -----------------------------------------------------------------------------------

def fetch_url(url: str, sha256: str | None, cache_dir: Path,
              open_url: OpenUrl | None = None) -> Path:
    """Download ``url`` once into ``cache_dir`` and verify it; returns the file (read-only).
    The cached file is used again only while it still matches what was fetched (checked by
    size and mtime, re-hashed after any change) and ``sha256``. ``open_url`` is the
    transport (tests pass their own).

    Raises InputUnavailable when it cannot be fetched or does not match ``sha256``."""
    key = hashlib.sha256(url.encode()).hexdigest()[:24]
    target = Path(cache_dir) / key / (Path(url.split("?")[0]).name or "download")
    record_path = target.with_name(".record.json")
    record = _read_record(record_path)
    if sha256 in (None, record.get("sha256")) and still_sealed(target, record.get("files")):
        _write_record(record_path, record)  # a re-hashed file's new mtime: not re-read next time
        return target
    drop_cached(target, record_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = _download(url, partial, open_url or _urlopen)
    if sha256 is not None and digest != sha256:
        partial.unlink(missing_ok=True)
        raise InputUnavailable("inputs", f"{url} has sha256 {digest}, not the {sha256} "
                                         "the experiment file gives")
    os.replace(partial, target)
    _write_record(record_path, {"sha256": digest, "files": seal(target)})
    return target


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _download(url: str, partial: Path, open_url: OpenUrl) -> str:
    digest = hashlib.sha256()
    try:
        with open_url(url) as response, open(partial, "wb") as out:
            total = int(getattr(response, "headers", {}).get("Content-Length") or 0)
            with progress_bar(f"fetching {partial.name}", total) as advance:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
    except OSError as err:  # urllib's URLError and HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise InputUnavailable("inputs", f"cannot fetch {url}: {err}") from None
    return digest.hexdigest()


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=60)  # type: ignore[no-any-return]
