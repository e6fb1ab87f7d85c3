"""inputs whose source lives at another provider (issue 11): a Kaggle dataset for local and
Colab sessions, a Drive file or folder for local and Kaggle sessions.

The adapter that owns the source downloads it (the real kagglesdk / pydrive2 clients against
the loopback emulators) into the pool's cache once; downloads are counted in the emulators'
request logs across two attempts or two experiments.
"""

from __future__ import annotations

import contextlib
import os
import time
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpupool.clock import SystemClock
from gpupool.errors import ProviderError, SpecError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.pool import Pool
from gpupool.scheduler import Scheduler
from gpupool.settings import PoolSettings
from gpupool.spec import InputSpec, load_experiment
from gpupool_providers.colab import inputs as colab_inputs
from gpupool_providers.colab.agent import bring_inputs
from gpupool_providers.kaggle import datasets
from tests.emulators.drive import Fault as DriveFault
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401
from tests.emulators.kaggle import Fault, KaggleEmulator
from tests.helpers import drive_until_done
from tests.providers.colab_support import make_provider
from tests.providers.test_colab_inputs import params_of, session_drive, spec_with
from tests.providers.test_kaggle_inputs import (  # noqa: F401
    digest,
    emu_fixture,
    experiment_file,
    input_uploads,
    isolated_env,
    session_lines,
)

KAGGLE = {"request_timeout": 5.0, "max_retries": 2, "backoff_base": 0.1, "backoff_max": 1,
          "dataset_poll_seconds": 0, "session_seconds": 60, "deadline_margin": 5,
          "startup_seconds": 1}


@pytest.fixture(autouse=True)
def no_browser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")
    monkeypatch.setattr(webbrowser, "open", lambda *a, **k: pytest.fail("a browser was opened"))


def make_pool(tmp: Path, **providers: object) -> Pool:
    """A pool with local (CPU), Kaggle against the emulator, and any providers given."""
    settings = PoolSettings(data_dir=tmp / "pool",
                            providers={"local": {"gpus": "none"}, "kaggle": KAGGLE})
    return Pool(settings, clock=SystemClock(sleep=lambda seconds: None),
                providers=providers)  # type: ignore[arg-type]


def local_file(tmp: Path, inputs: dict, name: str = "foreign", retries: int = 0,
               exit_code: int = 0) -> Path:
    path = experiment_file(tmp, inputs, name=name, retries=retries, exit_code=exit_code)
    path.write_text(path.read_text().replace("- kaggle", "- local"))
    return path


def run(pool: Pool, path: Path) -> ExperimentState:
    experiment = pool.submit(load_experiment(path), path)
    return drive_until_done(pool, experiment.id, timeout=180).state


def local_lines(pool: Pool) -> list[str]:
    lines = []
    for experiment in pool.state.experiments():
        for attempt in pool.state.attempts(experiment.id):
            log = pool.provider("local").logs(attempt)
            lines += [line for line in log.splitlines() if line.startswith("INPUT")]
    return lines


def media_calls(drive, file_id: str) -> list:  # type: ignore[no-untyped-def]
    return [r for r in drive.calls("files.download") if f"/files/{file_id}" in r.path]


# -- a Kaggle dataset ---------------------------------------------------------------------------

def test_local_session_reads_a_kaggle_dataset_downloaded_once(emu: KaggleEmulator,
                                                              tmp_path: Path) -> None:
    a, b = os.urandom(200_000), b"x,y\n1,2\n"
    emu.add_dataset("bob/corpus-set", {"a.bin": a, "t.csv": b}, private=False)
    pool = make_pool(tmp_path)
    # Two attempts (the command fails once, one retry), then a second experiment.
    first = local_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}}, retries=1, exit_code=3)
    assert run(pool, first) == ExperimentState.FAILED
    assert run(pool, local_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}},
                                name="again")) == ExperimentState.SUCCEEDED
    expected = f"INPUT GPUPOOL_INPUT_CORPUS 2 {digest(a, b)}"
    assert local_lines(pool) == [expected] * 3  # read in all three sessions
    assert emu.dataset_downloads() == ["bob/corpus-set"]  # downloaded once
    assert input_uploads(emu) == [] and emu.dataset_writes() == []
    cached = next((tmp_path / "pool" / "inputs" / "kaggle").glob("*/v1"))
    assert not os.access(cached / "a.bin", os.W_OK) or os.geteuid() == 0  # read-only


def test_a_new_dataset_version_is_downloaded_a_pinned_one_is_not(emu: KaggleEmulator,
                                                                 tmp_path: Path) -> None:
    emu.add_dataset("bob/corpus-set", {"t.csv": b"one"}, private=False)
    pool = make_pool(tmp_path)
    assert run(pool, local_file(tmp_path, {"c": {"kaggle": "bob/corpus-set"}})) == ExperimentState.SUCCEEDED
    emu.add_dataset("bob/corpus-set", {"t.csv": b"two"})
    assert run(pool, local_file(tmp_path, {"c": {"kaggle": "bob/corpus-set"}}, name="latest")) \
        == ExperimentState.SUCCEEDED
    assert run(pool, local_file(tmp_path, {"c": {"kaggle": "bob/corpus-set@1"}}, name="pinned")) \
        == ExperimentState.SUCCEEDED
    assert local_lines(pool) == [f"INPUT GPUPOOL_INPUT_C 1 {digest(x)}" for x in (b"one", b"two", b"one")]
    assert len(emu.dataset_downloads()) == 2


def test_a_cut_kaggle_download_resumes_by_range_and_verifies(emu: KaggleEmulator,
                                                             tmp_path: Path) -> None:
    data = os.urandom(400_000)
    emu.add_dataset("bob/big-set", {"big.bin": data}, private=False)
    emu.inject("download", Fault.truncate())  # half the zip arrives, then the connection closes
    pool = make_pool(tmp_path)
    assert run(pool, local_file(tmp_path, {"big": {"kaggle": "bob/big-set"}})) == ExperimentState.SUCCEEDED
    assert local_lines(pool) == [f"INPUT GPUPOOL_INPUT_BIG 1 {digest(data)}"]
    gets = emu.dataset_file_gets()
    assert len(gets) == 2 and gets[0] is None and (gets[1] or "").startswith("bytes=")
    assert int((gets[1] or "")[6:-1]) > 0  # only the rest was asked for
    assert emu.dataset_downloads() == ["bob/big-set"]


def test_an_expired_download_link_is_asked_for_again_and_the_download_resumed(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    data = os.urandom(400_000)
    emu.add_dataset("bob/big-set", {"big.bin": data}, private=False)
    # Half the zip arrives; then the signed URL answers 403, as an expired one does.
    emu.inject("download", Fault.truncate(), Fault.http(403, {"message": "expired"}))
    dest = tmp_path / "cache"
    got = make_pool(tmp_path).provider("kaggle").download_input(InputSpec(kaggle="bob/big-set"), dest)
    assert (got / "big.bin").read_bytes() == data
    assert emu.dataset_downloads() == ["bob/big-set"] * 2  # a fresh link
    whole, refused, fresh, rest = emu.dataset_file_gets()
    assert whole is None and fresh is None  # the fresh link's answer is closed unread
    assert refused == rest and (rest or "").startswith("bytes=")


def test_missing_kaggle_dataset_is_refused_before_a_local_placement(emu: KaggleEmulator,
                                                                    tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    path = local_file(tmp_path, {"corpus": {"kaggle": "bob/no-such-set"}})
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    assert caught.value.exit_code == 2
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.corpus.kaggle (line ") and "does not exist or is not readable" in what
    assert pool.state.experiments() == []


def test_kaggle_dataset_deleted_after_submit_fails_the_local_attempt(emu: KaggleEmulator,
                                                                     tmp_path: Path) -> None:
    emu.add_dataset("bob/corpus-set", {"t.csv": b"1"}, private=False)
    pool = make_pool(tmp_path)
    path = local_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}})
    experiment = pool.submit(load_experiment(path), path)
    del emu.datasets[("bob", "corpus-set")]
    assert drive_until_done(pool, experiment.id, timeout=60).state == ExperimentState.FAILED
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.FAILED
    assert "input 'corpus': Kaggle dataset bob/corpus-set does not exist or is not readable" \
        in (attempt.end_reason or "")


def test_colab_session_gets_a_kaggle_dataset_through_drive(emu: KaggleEmulator, drive_emulator,
                                                           tmp_path: Path) -> None:
    data = os.urandom(120_000)
    emu.add_dataset("bob/corpus-set", {"c.bin": data}, private=False)
    colab = make_provider(drive_emulator, tmp_path)
    pool = make_pool(tmp_path, colab=colab)
    spec = spec_with({"corpus": {"kaggle": "bob/corpus-set"}})
    experiment = pool.submit(spec)
    Scheduler(pool).reconcile_once(time.time())
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.SUBMITTED
    plan = params_of(drive_emulator, colab, attempt)
    assert plan["corpus"]["kind"] == "drive_content"
    # A second attempt (another experiment, same pool) finds both the download and the folder,
    # and reads no byte of it again (hashes cached by size and mtime).
    inputs = colab.inputs()
    assert inputs.prepare(spec_with({"corpus": {"kaggle": "bob/corpus-set"}}, name="again")) == plan
    assert inputs.cache.hashed_bytes == 0
    env = bring_inputs(session_drive(drive_emulator), plan, tmp_path / "vm")
    assert (Path(env["GPUPOOL_INPUT_CORPUS"]) / "c.bin").read_bytes() == data
    assert emu.dataset_downloads() == ["bob/corpus-set"]
    assert sum(1 for f in drive_emulator.state.files.values() if f.title == "c.bin") == 1


# -- a Drive file or folder ---------------------------------------------------------------------

def drive_tree(drive, files: dict[str, bytes]) -> str:  # type: ignore[no-untyped-def]
    root = drive.state.mkdir("my-shards")
    for rel, data in files.items():
        parent = root
        for part in rel.split("/")[:-1]:
            parent = next((f for f in drive.state.children(parent.id) if f.title == part), None) \
                or drive.state.mkdir(part, parent.id)
        drive.state.create(rel.split("/")[-1], parents=[parent.id], content=data)
    return str(root.id)


def test_local_session_reads_a_drive_folder_downloaded_once(emu: KaggleEmulator, drive_emulator,
                                                            tmp_path: Path) -> None:
    a, b = os.urandom(300_000), os.urandom(1000)
    folder = drive_tree(drive_emulator, {"a.bin": a, "sub/b.bin": b})
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    path = local_file(tmp_path, {"shards": {"drive": folder}}, retries=1, exit_code=3)
    assert run(pool, path) == ExperimentState.FAILED  # two attempts
    assert run(pool, local_file(tmp_path, {"shards": {"drive": folder}}, name="again")) \
        == ExperimentState.SUCCEEDED
    assert local_lines(pool) == [f"INPUT GPUPOOL_INPUT_SHARDS 2 {digest(a, b)}"] * 3
    files = {f.title: f.id for f in drive_emulator.state.files.values()}
    # 300 000 bytes in 256 KiB ranges: two media requests, once; the small file one.
    assert len(media_calls(drive_emulator, files["a.bin"])) == 2
    assert len(media_calls(drive_emulator, files["b.bin"])) == 1


def test_a_cut_drive_download_resumes_where_it_stopped(emu: KaggleEmulator, drive_emulator,
                                                       tmp_path: Path) -> None:
    data = os.urandom(600_000)
    item = drive_emulator.state.create("big.bin", content=data)
    colab = make_provider(drive_emulator, tmp_path)
    dest = tmp_path / "cache"
    drive_emulator.inject("files.download", DriveFault(truncate=True))  # a range cut mid-way
    # An earlier run stopped after 300 000 bytes (its partial file is kept).
    with pytest.raises(KeyboardInterrupt):
        original = colab.drive().download_ranges

        def stop_midway(file_id, target, size, advance=lambda n: None):  # type: ignore[no-untyped-def]
            original(file_id, target, 300_000, advance)
            raise KeyboardInterrupt

        colab.drive().download_ranges = stop_midway  # type: ignore[method-assign]
        colab_inputs.download_drive_input(colab.drive(), item.id, dest)
    del colab.drive().download_ranges
    before = len(media_calls(drive_emulator, item.id))
    got = colab.download_input(InputSpec(drive=item.id), dest)
    assert got.read_bytes() == data and got.name == "big.bin"
    later = [r.headers.get("range") for r in media_calls(drive_emulator, item.id)[before:]]
    assert later and later[0].startswith("bytes=300000-")  # only the rest was asked for
    assert not list(dest.rglob("*.partial"))


def test_a_corrupt_drive_download_is_not_kept(drive_emulator, tmp_path: Path) -> None:
    item = drive_emulator.state.create("v.txt", content=b"words")
    colab = make_provider(drive_emulator, tmp_path)
    original = colab.drive().download_ranges

    def flip(file_id, target, size, advance=lambda n: None):  # type: ignore[no-untyped-def]
        original(file_id, target, size, advance)
        target.write_bytes(b"wordX")

    colab.drive().download_ranges = flip  # type: ignore[method-assign]
    with pytest.raises(ProviderError, match="different md5"):
        colab.download_input(InputSpec(drive=item.id), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_kaggle_session_gets_a_drive_file_as_a_dataset_once(emu: KaggleEmulator, drive_emulator,
                                                            tmp_path: Path) -> None:
    data = os.urandom(150_000)
    item = drive_emulator.state.create("vocab.bin", content=data)
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    path = experiment_file(tmp_path, {"vocab": {"drive": item.id}}, retries=1, exit_code=3)
    assert run(pool, path) == ExperimentState.FAILED  # two attempts
    expected = f"INPUT GPUPOOL_INPUT_VOCAB 1 {digest(data)}"
    assert session_lines(emu) == [expected, expected]
    assert len(media_calls(drive_emulator, item.id)) == 1  # downloaded once
    assert input_uploads(emu).count("data.tar") == 1  # and uploaded once


def test_missing_drive_file_is_refused_before_a_kaggle_placement(emu: KaggleEmulator, drive_emulator,
                                                                 tmp_path: Path) -> None:
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    path = experiment_file(tmp_path, {"vocab": {"drive": "1NoSuchFileId"}})
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.vocab.drive (line ") and "does not exist or is not readable" in what
    assert pool.state.experiments() == [] and not emu.kernels


# -- progress and damage --------------------------------------------------------------------------

class Bars:
    """Stands in for gpupool.inputs.progress_bar: records each bar's label, total and advances."""

    def __init__(self) -> None:
        self.bars: list[list] = []

    @contextlib.contextmanager
    def __call__(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        bar = [label, total, 0]
        self.bars.append(bar)
        yield lambda n: bar.__setitem__(2, bar[2] + n)


def test_downloads_report_progress_in_bytes(emu: KaggleEmulator, drive_emulator, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bars = Bars()
    monkeypatch.setattr(datasets, "progress_bar", bars)
    monkeypatch.setattr(colab_inputs, "progress_bar", bars)
    emu.add_dataset("bob/corpus-set", {"c.bin": os.urandom(100_000)}, private=False)
    item = drive_emulator.state.create("d.bin", content=os.urandom(90_000))
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    pool.sources.fetch("corpus", InputSpec(kaggle="bob/corpus-set"))
    pool.sources.fetch("shards", InputSpec(drive=item.id))
    [kaggle_bar, drive_bar] = bars.bars
    assert "bob/corpus-set" in kaggle_bar[0] and kaggle_bar[1] == kaggle_bar[2] > 100_000
    assert item.id in drive_bar[0] and drive_bar[1] == drive_bar[2] == 90_000


def test_a_damaged_partial_kaggle_download_is_caught_and_fetched_again(
        emu: KaggleEmulator, tmp_path: Path) -> None:
    import requests

    data = os.urandom(300_000)
    emu.add_dataset("bob/big-set", {"big.bin": data}, private=False)
    whole = requests.get(f"{emu.url}/emu/datasets/bob/big-set/1.zip", timeout=10).content
    dest = tmp_path / "cache"
    dest.mkdir()
    damaged = bytearray(whole[: len(whole) // 2])
    damaged[1000] ^= 0xFF  # a flipped bit in what an earlier, cut download kept
    (dest / "v1.zip.partial").write_bytes(bytes(damaged))
    kaggle = make_pool(tmp_path).provider("kaggle")
    with pytest.raises(ProviderError, match="damaged"):
        kaggle.download_input(InputSpec(kaggle="bob/big-set"), dest)
    assert not (dest / "v1").exists() and not (dest / "v1.zip.partial").exists()
    assert emu.dataset_file_gets()[-1] == f"bytes={len(damaged)}-"  # it had resumed
    got = kaggle.download_input(InputSpec(kaggle="bob/big-set"), dest)
    assert (got / "big.bin").read_bytes() == data


def test_drive_file_deleted_after_submit_fails_the_local_attempt(emu: KaggleEmulator, drive_emulator,
                                                                 tmp_path: Path) -> None:
    item = drive_emulator.state.create("vocab.txt", content=b"words")
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    path = local_file(tmp_path, {"vocab": {"drive": item.id}})
    experiment = pool.submit(load_experiment(path), path)
    with drive_emulator.state.lock:
        del drive_emulator.state.files[item.id]
    assert drive_until_done(pool, experiment.id, timeout=60).state == ExperimentState.FAILED
    [attempt] = pool.state.attempts(experiment.id)
    assert attempt.state == AttemptState.FAILED
    assert f"{item.id} does not exist or is not readable" in (attempt.end_reason or "")


def test_drive_sign_in_revoked_after_submit_fails_the_attempt_with_the_reason(
        emu: KaggleEmulator, drive_emulator, tmp_path: Path) -> None:
    item = drive_emulator.state.create("vocab.txt", content=b"words")
    pool = make_pool(tmp_path, colab=make_provider(drive_emulator, tmp_path))
    path = local_file(tmp_path, {"vocab": {"drive": item.id}})
    experiment = pool.submit(load_experiment(path), path)
    drive_emulator.state.revoke_refresh_token()
    drive_emulator.state.expire_access_tokens()
    assert drive_until_done(pool, experiment.id, timeout=60).state == ExperimentState.FAILED
    [attempt] = pool.state.attempts(experiment.id)  # failed once, not waited on as unavailable
    assert attempt.state == AttemptState.FAILED
    reason = attempt.end_reason or ""
    assert "input 'vocab'" in reason and "gpupool auth colab" in reason
