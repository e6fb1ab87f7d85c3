"""inputs: on Kaggle, against the loopback emulator through the real kagglesdk client.

Kernels really run: the pushed bootstrap script finds each input under the fake /kaggle/input,
verifies it and hands its path to the user's command in GPUPOOL_INPUT_<NAME>. Uploads are
counted in the emulator's request log.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpupool.clock import SystemClock
from gpupool.errors import GpupoolError, SpecError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import load_experiment
from gpupool.state import Experiment
from gpupool_providers.kaggle import KaggleProvider
from gpupool_providers.kaggle.kernel import script_marker
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.helpers import drive_until_done
from tests.test_inputs import CHECK_SCRIPT, make_data

INPUT_FILES = ("data.tar", "gpupool-content.json")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for name in [k for k in os.environ if k.startswith(("GPUPOOL_", "KAGGLE_"))]:
        monkeypatch.delenv(name)


@pytest.fixture(name="emu")
def emu_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KaggleEmulator]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with KaggleEmulator("alice", "alice-key", workdir=tmp_path / "emu", session_cap_seconds=60,
                        extra_env={"PATH": path}) as emulator:
        emulator.connect(monkeypatch)
        yield emulator


def make_pool(tmp: Path) -> Pool:
    section = {"request_timeout": 5.0, "max_retries": 2, "backoff_base": 0.1, "backoff_max": 1,
               "dataset_poll_seconds": 0, "session_seconds": 60, "deadline_margin": 5,
               "startup_seconds": 1}
    pool = Pool(PoolSettings(data_dir=tmp / "pool", providers={"kaggle": section}),
                clock=SystemClock(sleep=lambda seconds: None))
    assert isinstance(pool.provider("kaggle"), KaggleProvider)
    return pool


def experiment_file(tmp: Path, inputs: dict, *, name: str = "kaggle-inputs", exit_code: int = 0,
                    retries: int = 0, sleep: float = 0) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    (work / "check.py").write_text(CHECK_SCRIPT)
    run = "python check.py" + (f" && sleep {sleep:g}" if sleep else "")
    data = {"name": name, "workdir": "work", "run": run, "providers": ["kaggle"],
            "resources": {"gpu": "none"}, "limits": {"retries_on_error": retries},
            "env": {"EXIT_CODE": str(exit_code)}, "inputs": inputs}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(pool: Pool, path: Path) -> Experiment:
    experiment = pool.submit(load_experiment(path), path)
    return drive_until_done(pool, experiment.id, timeout=180)


def session_lines(emu: KaggleEmulator) -> list[str]:
    lines = []
    for session in sorted(emu.sessions.values(), key=lambda s: s.id):
        text = "".join(entry["data"] for entry in session.log)
        lines += [line for line in text.splitlines() if line.startswith(("INPUT", "gpupool:"))]
    return lines


def input_uploads(emu: KaggleEmulator) -> list[str]:
    return [name for name in emu.uploads() if name in INPUT_FILES]


def digest(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


def test_local_input_is_uploaded_once_across_attempts_and_experiments(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    a, b = os.urandom(300_000), os.urandom(200_000)
    make_data(tmp_path / "data", {"a.bin": a, "sub/b.bin": b})
    pool = make_pool(tmp_path)
    # Two attempts (the first run command fails, one retry): the input goes up once.
    first = run(pool, experiment_file(tmp_path, {"train": "data"}, exit_code=3, retries=1))
    assert first.state == ExperimentState.FAILED
    assert [x.state for x in pool.state.attempts(first.id)] == [AttemptState.FAILED] * 2
    assert sorted(input_uploads(emu)) == sorted(INPUT_FILES)
    content_sets = [w for w in emu.dataset_writes() if "-in-" in w]
    assert len(content_sets) == 1
    expected = f"INPUT GPUPOOL_INPUT_TRAIN 2 {digest(a, b)}"
    assert session_lines(emu) == [expected, expected]  # read, verified, in both sessions
    # A second experiment with the same data uploads nothing of it.
    second = run(pool, experiment_file(tmp_path, {"train": "data"}, name="same-data"))
    assert second.state == ExperimentState.SUCCEEDED
    assert sorted(input_uploads(emu)) == sorted(INPUT_FILES)
    assert [w for w in emu.dataset_writes() if "-in-" in w] == content_sets
    assert session_lines(emu)[-1] == expected


def test_changed_content_is_uploaded_again(emu: KaggleEmulator, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"one" * 1000)
    pool = make_pool(tmp_path)
    assert run(pool, experiment_file(tmp_path, {"blob": "data.bin"})).state == ExperimentState.SUCCEEDED
    data.write_bytes(b"two" * 1000)
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))
    assert run(pool, experiment_file(tmp_path, {"blob": "data.bin"}, name="changed")).state \
        == ExperimentState.SUCCEEDED
    assert input_uploads(emu).count("data.tar") == 2
    assert session_lines(emu) == [f"INPUT GPUPOOL_INPUT_BLOB 1 {digest(b'one' * 1000)}",
                                  f"INPUT GPUPOOL_INPUT_BLOB 1 {digest(b'two' * 1000)}"]
    # A new version of the input's one dataset, not a new dataset; no experiment uses the
    # first content any more, so its version's files were dropped (deleteOldVersions).
    (dataset,) = [d for d in emu.live_datasets() if "-in-" in d.slug]
    assert dataset.slug == "gpupool-in-blob" and dataset.is_private
    assert [bool(v.files) for v in dataset.versions] == [False, True]
    pushes = [r.json["datasetDataSources"] for r in emu.requests if r.endpoint == "SaveKernel"]
    assert "alice/gpupool-in-blob/1" in pushes[0] and "alice/gpupool-in-blob/2" in pushes[1]


def test_two_contents_of_one_input_in_two_live_experiments_are_two_kept_versions(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    (tmp_path / "one").write_bytes(b"1" * 5000)
    (tmp_path / "two").write_bytes(b"2" * 5000)
    pool = make_pool(tmp_path)
    scheduler = Scheduler(pool)
    first = pool.submit(load_experiment(path := experiment_file(
        tmp_path, {"blob": "one"}, name="first", sleep=60)), path)
    scheduler.reconcile_once(time.time())
    second = run(pool, experiment_file(tmp_path, {"blob": "two"}, name="second"))
    assert second.state == ExperimentState.SUCCEEDED
    (dataset,) = [d for d in emu.live_datasets() if "-in-" in d.slug]
    assert [bool(v.files) for v in dataset.versions] == [True, True]  # the first still uses v1
    assert pool.state.attempts(first.id)[0].state == AttemptState.SUBMITTED or \
        pool.state.attempts(first.id)[0].state == AttemptState.RUNNING
    assert input_uploads(emu).count("data.tar") == 2


def test_input_unused_for_unused_input_days_is_deleted(emu: KaggleEmulator,
                                                       tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"x" * 5000)
    pool = make_pool(tmp_path)
    provider = pool.provider("kaggle")
    assert run(pool, experiment_file(tmp_path, {"blob": "blob"})).state == ExperimentState.SUCCEEDED
    assert [d.slug for d in emu.live_datasets()] == ["gpupool-in-blob"]  # the code is gone
    keep = provider.config.unused_input_days * 86400  # type: ignore[attr-defined]
    scheduler, now = Scheduler(pool), time.time()
    scheduler.reconcile_once(now + keep - 60)
    assert [d.slug for d in emu.live_datasets()] == ["gpupool-in-blob"]  # a re-run would reuse it
    scheduler.reconcile_once(now + keep + 1)
    assert not emu.live_datasets()
    again = run(pool, experiment_file(tmp_path, {"blob": "blob"}, name="later"))
    assert again.state == ExperimentState.SUCCEEDED  # uploaded again, as a new dataset
    assert input_uploads(emu).count("data.tar") == 2


def test_existing_kaggle_dataset_is_attached_without_any_upload(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.add_dataset("bob/corpus-set", {"train.csv": b"x,y\n1,2\n"}, private=False)
    emu.add_dataset("bob/corpus-set", {"train.csv": b"x,y\n3,4\n5,6\n"})  # version 2
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set@1"}})
    assert run(pool, path).state == ExperimentState.SUCCEEDED
    assert input_uploads(emu) == [] and not [w for w in emu.dataset_writes() if "corpus" in w]
    assert session_lines(emu) == ["INPUT GPUPOOL_INPUT_CORPUS 1 " + digest(b"x,y\n1,2\n")]
    push = next(r.json for r in emu.requests if r.endpoint == "SaveKernel")
    assert "bob/corpus-set/1" in push["datasetDataSources"]


def test_missing_kaggle_dataset_fails_before_placement_with_its_line(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": "bob/no-such-set"}})
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    assert caught.value.exit_code == 2
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.corpus.kaggle (line ")
    assert "bob/no-such-set does not exist or is not readable" in what and "alice" in what
    assert pool.state.experiments() == [] and not emu.kernels


def test_dataset_deleted_after_submit_fails_the_attempt_not_a_retry_loop(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.add_dataset("bob/corpus-set", {"train.csv": b"1"}, private=False)
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}})
    experiment = pool.submit(load_experiment(path), path)
    del emu.datasets[("bob", "corpus-set")]
    done = drive_until_done(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.FAILED
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 1 and attempts[0].state == AttemptState.FAILED
    assert "bob/corpus-set no longer exists" in (attempts[0].end_reason or "")
    assert not emu.kernels  # nothing was pushed for it


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(name="web")
def web_fixture(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "web"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: Files(*a, directory=str(root)))  # type: ignore[misc]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_url_input_is_fetched_and_verified_in_the_kernel(
        emu: KaggleEmulator, tmp_path: Path, web: tuple[str, Path]) -> None:
    base, root = web
    (root / "vocab.txt").write_bytes(b"hello\n" * 100)
    pool = make_pool(tmp_path)
    good = {"vocab": {"url": f"{base}/vocab.txt", "sha256": digest(b"hello\n" * 100)}}
    assert run(pool, experiment_file(tmp_path, good)).state == ExperimentState.SUCCEEDED
    assert session_lines(emu) == ["INPUT GPUPOOL_INPUT_VOCAB 1 " + digest(b"hello\n" * 100)]
    assert input_uploads(emu) == []
    bad = {"vocab": {"url": f"{base}/vocab.txt", "sha256": "0" * 64}}
    failed = run(pool, experiment_file(tmp_path, bad, name="bad-hash"))
    assert failed.state == ExperimentState.FAILED
    assert any("not " + "0" * 64 in line for line in session_lines(emu))


def test_marker_and_push_name_every_input(emu: KaggleEmulator, tmp_path: Path) -> None:
    make_data(tmp_path / "data", {"a.bin": b"abc"})
    emu.add_dataset("bob/corpus-set", {"t.csv": b"1"}, private=False)
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"train": "data", "corpus": {"kaggle": "bob/corpus-set"}})
    assert run(pool, path).state == ExperimentState.SUCCEEDED
    push = next(r.json for r in emu.requests if r.endpoint == "SaveKernel")
    sources = push["datasetDataSources"]
    assert "bob/corpus-set" in sources and any("-in-" in s for s in sources) and len(sources) == 3
    marker = script_marker(push["text"])  # the kernel's script carries it
    assert set(marker["inputs"]) == {"train", "corpus"}
    assert marker["code"] in sources and marker["checkpoint"] is None


def test_content_dataset_kaggle_failed_to_process_is_uploaded_again(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    make_data(tmp_path / "data", {"a.bin": b"abc"})
    pool = make_pool(tmp_path)
    assert run(pool, experiment_file(tmp_path, {"train": "data"})).state == ExperimentState.SUCCEEDED
    emu.inject("GetDatasetStatus", Fault.status("FAILED"))  # the content dataset's next check
    again = run(pool, experiment_file(tmp_path, {"train": "data"}, name="after-failure"))
    assert again.state == ExperimentState.SUCCEEDED
    assert input_uploads(emu).count("data.tar") == 2
    assert [r.endpoint for r in emu.requests].count("DeleteDataset") >= 1


def test_url_input_refused_up_front_when_kernels_have_no_internet(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    pool.provider("kaggle").config.enable_internet = False  # type: ignore[attr-defined]
    path = experiment_file(tmp_path, {"words": {"url": "https://example.org/words.txt"}})
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.words.url (line ") and "without internet" in what


class Terminal(io.StringIO):
    """stderr as a terminal: progress bars are drawn into it."""

    def isatty(self) -> bool:
        return True


def test_upload_shows_size_rate_and_eta_and_sends_what_was_hashed(
        emu: KaggleEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data.tar"
    data.write_bytes(os.urandom(12 * 1024 * 1024))  # over PROGRESS_BYTES
    remote = make_pool(tmp_path).provider("kaggle").remote  # type: ignore[attr-defined]
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "150")
    token = remote.upload(data, digest(data.read_bytes()))
    drawn = screen.getvalue()
    assert "uploading data.tar" in drawn and "12.6 MB" in drawn  # size
    assert "/s" in drawn and re.search(r"\d+:\d\d:\d\d", drawn)  # rate and time left
    assert emu.blobs[token].data == data.read_bytes()
    with pytest.raises(GpupoolError, match="changed while it was uploaded"):
        remote.upload(data, "0" * 64)  # what was sent is not what was hashed: never used


def test_small_upload_draws_nothing(emu: KaggleEmulator, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "small.bin"
    data.write_bytes(b"x" * 1000)
    remote = make_pool(tmp_path).provider("kaggle").remote  # type: ignore[attr-defined]
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    remote.upload(data, digest(b"x" * 1000))
    assert screen.getvalue() == ""


def test_cut_upload_resumes_where_it_stopped_and_is_verified(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    data = tmp_path / "data.tar"
    data.write_bytes(os.urandom(3_000_000))
    remote = make_pool(tmp_path).provider("kaggle").remote  # type: ignore[attr-defined]
    emu.inject("upload", Fault.cut(1_000_000))
    token = remote.upload(data, digest(data.read_bytes()))
    assert emu.blobs[token].data == data.read_bytes()
    puts = [r for r in emu.requests if r.endpoint == "upload"]
    assert [r.headers.get("Content-Range") for r in puts] == [
        None, "bytes */3000000", "bytes 1000000-2999999/3000000"]  # probe, then the rest only
    assert len(puts[-1].body) == 2_000_000
