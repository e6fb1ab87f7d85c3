"""Hostile and malformed input: pool files (hypothesis), Drive listings and Kaggle outputs with
paths that escape, names unsafe in a path or a Drive query, and pickles that run code."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.errors import CheckpointError, ConfigError, GpupoolError, SpecError
from gpupool.manifest import Manifest, ManifestError, publish_local, verify_local
from gpupool.provider import load_provider_class
from gpupool.settings import load_settings
from gpupool.store import CheckpointStore
from gpupool_providers.colab import ColabConfig, ColabProvider
from gpupool_providers.kaggle.client import OutputFile
from gpupool_providers.kaggle.outputs import checkpoint_files, safe_name

# -- pool files -------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
PROVIDER_KEYS = ["enabled", "max_concurrent", "session_seconds", "request_timeout", "max_retries",
                 "public", "gpus", "windows", "accelerator", "folder", "heartbeat_seconds",
                 "upload_chunk_bytes", "deadline_margin", "bogus"]
sections = st.dictionaries(st.sampled_from(PROVIDER_KEYS), scalars, max_size=4)
pool_files = st.fixed_dictionaries({}, optional={
    "poll_interval": scalars, "database_url": scalars, "store_url": scalars, "data_dir": scalars,
    "providers": st.one_of(scalars, st.dictionaries(st.sampled_from(["local", "kaggle", "colab"]),
                                                    st.one_of(sections, scalars), max_size=3)),
    "unknown_key": scalars,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=pool_files)
def test_malformed_pool_files_give_field_errors_never_tracebacks(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        pool = load_settings(path)
        for name in pool.providers:
            try:
                load_provider_class(name).from_section(pool.provider_section(name), tmp_path / name,
                                                       lambda: 0.0)
            except (SpecError, ConfigError) as err:
                assert f"providers.{name}" in str(err), err
    except (SpecError, ConfigError) as err:
        assert "line" in str(err) or "providers." in str(err) or "file" in str(err), err
    # validation writes nothing: no database, no data dir, no provider folders
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_malformed_pool_file_names_the_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("poll_interval: 5\nproviders:\n  kaggle:\n    max_retries: lots\n")
    with pytest.raises(SpecError, match=r"providers\.kaggle\.max_retries \(line 4\)"):
        load_settings(path)  # checked when loaded, not when the provider is first used
    path.write_text("poll_interval: -1\n")
    with pytest.raises(SpecError, match="line 1"):
        load_settings(path)


# -- untrusted Drive listings (Colab collect) ---------------------------------------------------

class FakeDrive:
    """Folders and files by id; ids are paths, titles come from the (hostile) listing."""

    def __init__(self) -> None:
        self.items: dict[str, list[dict]] = {}
        self.content: dict[str, bytes] = {}

    def add(self, parent: str, title: str, data: bytes | None = None) -> str:
        ident = f"{parent}/{len(self.content)}"
        self.items.setdefault(parent, []).append({"id": ident, "title": title})
        self.content[ident] = data or b""
        return ident

    def children(self, parent: str) -> list[dict]:
        return list(self.items.get(parent, []))

    def find(self, parent: str, title: str) -> dict | None:
        return next((i for i in self.items.get(parent, []) if i["title"] == title), None)

    def download(self, ident: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.content[ident])
        return target


def hostile_colab(tmp_path: Path, titles: list[str]) -> tuple[ColabProvider, FakeDrive]:
    colab = ColabProvider(ColabConfig(), tmp_path / "colab", lambda: 0.0)
    drive = FakeDrive()
    checkpoints = drive.add("root", "checkpoints")
    staging = tmp_path / "made"
    (staging).mkdir()
    (staging / "state.pt").write_bytes(b"weights")
    manifest = publish_local(staging, tmp_path / "published", step=3, attempt="a1")
    for title in titles:
        folder = drive.add(checkpoints, title)
        drive.add(folder, "manifest.json", manifest.to_json().encode())
        drive.add(folder, "state.pt", b"weights")
    colab.drive = lambda: drive  # type: ignore[method-assign]
    colab._folder = lambda attempt: "root"  # type: ignore[method-assign]
    return colab, drive


@pytest.mark.parametrize("title", ["../ckpt-escape", "/tmp/ckpt-absolute", "ckpt-a/../../b",
                                   "ckpt-000000000003-ok-but-not-its-manifest"])
def test_drive_checkpoint_titles_that_escape_are_rejected(tmp_path: Path, title: str) -> None:
    outside = tmp_path / "colab" / "collect"
    colab, _ = hostile_colab(tmp_path, [title])
    store = CheckpointStore(str(tmp_path / "store"))
    with pytest.raises(CheckpointError, match="corrupt"):
        colab.collect(SimpleNamespace(id="a1"), store)  # type: ignore[arg-type]
    assert store.list() == []
    assert not (tmp_path / "ckpt-escape").exists() and not Path("/tmp/ckpt-absolute").exists()
    written = [p for p in tmp_path.rglob("manifest.json") if "published" not in p.parts]
    assert all(outside in p.parents for p in written) or not written


# -- untrusted Kaggle outputs ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "gpupool/checkpoints/../../x", "a\\..\\b",
                                  "C:/x", "", "gpupool/./x"])
def test_kaggle_output_names_that_escape_are_rejected(name: str) -> None:
    assert safe_name(name) is None
    complete = "gpupool/checkpoints/ckpt-1/manifest.json"
    files = [OutputFile(complete, "u"), OutputFile(f"gpupool/checkpoints/ckpt-1/{name}", "u")]
    assert all(safe_name(f.name) for f in checkpoint_files(files))


def test_symlinked_checkpoint_file_is_rejected(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    staging.mkdir()
    (staging / "state.pt").write_bytes(b"weights")
    manifest = publish_local(staging, tmp_path / "root", step=1)
    directory = tmp_path / "root" / manifest.name
    secret = tmp_path / "secret"
    secret.write_bytes(b"weights")
    (directory / "state.pt").unlink()
    os.symlink(secret, directory / "state.pt")
    with pytest.raises(ManifestError):
        verify_local(directory, manifest)


def test_a_hostile_manifest_raises_gpupools_error_not_a_value_error() -> None:
    """Issue 13 item 2: ManifestError is part of gpupool's tree (a CheckpointError), so a
    caller catching gpupool's errors sees it and one catching ValueError for JSON does not."""
    for text in ("{", '{"name": "../x", "step": 1, "created": 0, "files": []}',
                 '{"name": "ckpt-1", "step": 1, "created": 0,'
                 ' "files": [{"path": "/etc/passwd", "size": 1, "sha256": "x"}]}'):
        with pytest.raises(CheckpointError) as raised:
            Manifest.from_json(text)
        assert isinstance(raised.value, GpupoolError) and not isinstance(raised.value, ValueError)


# -- names in a Drive query and in paths --------------------------------------------------------

def test_drive_query_escapes_quotes_and_backslashes() -> None:
    from gpupool_providers.colab.drive import Drive

    queries: list[str] = []
    drive = Drive.__new__(Drive)
    drive.list = lambda query: queries.append(query) or []  # type: ignore[method-assign]
    drive.find("root", "it's a \\ trap' or title contains '")
    assert queries == ["'root' in parents and title='it\\'s a \\\\ trap\\' or title contains \\'' "
                       "and trashed=false"]


@pytest.mark.parametrize("name", ["../up", "/abs", "a/../../b", "a\\b"])
def test_experiment_ids_unsafe_in_a_path_are_refused_by_the_store(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError):
        CheckpointStore(str(tmp_path)).child(name)


# -- checkpoints load with weights_only --------------------------------------------------------

class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch pwned-by-pickle",))


def test_training_state_with_a_malicious_pickle_is_refused(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    import gpupool.torch as gt

    monkeypatch.chdir(tmp_path)
    torch.save({"format": "gpupool-training-state", "payload": Evil()}, tmp_path / gt.STATE_FILE)
    with pytest.raises(CheckpointError):
        gt.load_training_state(tmp_path, model=torch.nn.Linear(1, 1))
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_nul_in_pool_data_dir_is_a_field_error(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"data_dir": "a\x00b"}))
    with pytest.raises(SpecError, match=r"data_dir \(line 1\).*NUL"):
        load_settings(path)
