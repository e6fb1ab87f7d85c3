"""Kaggle inputs that are not there: a dataset version that does not exist is refused before
anything is placed (exit 2, field and line), and one that goes away later fails the run once
with the reason, with retries left (no retry loop). Real kagglesdk against the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpupool.errors import SpecError
from gpupool.lifecycle import AttemptState, ExperimentState
from gpupool.spec import load_experiment
from gpupool_providers.kaggle.inputs import InputPlan, InputShipper
from tests.emulators.drive import drive_emulator_fixture  # noqa: F401
from tests.emulators.kaggle import KaggleEmulator
from tests.helpers import drive_until_done
from tests.providers.test_kaggle_inputs import (  # noqa: F401 - fixtures used by name
    emu_fixture,
    experiment_file,
    isolated_env,
    make_pool,
)


@pytest.mark.parametrize("ref", ["bob/corpus-set@7", "bob/corpus-set@2"])
def test_a_version_that_does_not_exist_is_refused_before_placement(
        emu: KaggleEmulator, tmp_path: Path, ref: str) -> None:
    emu.add_dataset("bob/corpus-set", {"train.csv": b"1"}, private=False)  # version 1 only
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": ref}}, retries=2)
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    assert caught.value.exit_code == 2
    (where, what), = caught.value.problems
    assert where == "inputs.corpus.kaggle (line 14)"
    version = ref.rpartition("@")[2]
    assert f"version {version} of Kaggle dataset bob/corpus-set (the newest is 1) does not exist" in what
    assert pool.state.experiments() == [] and not emu.kernels


def test_a_version_gone_after_submit_fails_the_run_once(emu: KaggleEmulator, tmp_path: Path) -> None:
    emu.add_dataset("bob/corpus-set", {"train.csv": b"1"}, private=False)
    emu.add_dataset("bob/corpus-set", {"train.csv": b"2"})
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set@2"}}, retries=2)
    experiment = pool.submit(load_experiment(path), path)
    emu.datasets[("bob", "corpus-set")].versions.pop()  # version 2 withdrawn
    done = drive_until_done(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.FAILED
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 1 and attempts[0].state == AttemptState.FAILED
    gone = "version 2 of Kaggle dataset bob/corpus-set (the newest is 1) no longer exists"
    assert gone in (done.message or "")
    assert not emu.kernels


def test_an_input_missing_in_the_session_fails_the_run_once(
        emu: KaggleEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel cannot find an input's dataset (gone between the check and the session):
    the session records why, and the run fails at once instead of retrying."""
    emu.add_dataset("bob/corpus-set", {"train.csv": b"1"}, private=False)
    prepare = InputShipper.prepare

    def lose_the_source(self: InputShipper, *args: Any, **kwargs: Any) -> InputPlan:
        plan = prepare(self, *args, **kwargs)
        plan.sources.clear()  # the kernel runs without the dataset attached
        return plan

    monkeypatch.setattr(InputShipper, "prepare", lose_the_source)
    pool = make_pool(tmp_path)
    path = experiment_file(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}}, retries=2)
    experiment = pool.submit(load_experiment(path), path)
    done = drive_until_done(pool, experiment.id, timeout=120)
    assert done.state == ExperimentState.FAILED
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 1 and attempts[0].state == AttemptState.FAILED
    assert "input 'corpus': dataset bob/corpus-set is not attached" in (done.message or "")


# -- caches of downloaded inputs notice changed bytes --------------------------------------------

def _tamper(path: Path, data: bytes) -> None:
    """Write other bytes of the same size and put the mtime back (as a careless edit would)."""
    import os

    before = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(0o444)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_changed_kaggle_download_is_downloaded_again(emu: KaggleEmulator, tmp_path: Path) -> None:
    from gpupool.spec import InputSpec

    emu.add_dataset("bob/corpus-set", {"t.csv": b"x,y\n1,2\n"}, private=False)
    kaggle = make_pool(tmp_path).provider("kaggle")
    dest = tmp_path / "cache"
    got = kaggle.download_input(InputSpec(kaggle="bob/corpus-set"), dest)
    assert (got / "t.csv").stat().st_mode & 0o777 == 0o444
    assert kaggle.download_input(InputSpec(kaggle="bob/corpus-set"), dest) == got
    assert emu.dataset_downloads() == ["bob/corpus-set"]  # unchanged: used again
    _tamper(got / "t.csv", b"x,y\n6,6\n")
    again = kaggle.download_input(InputSpec(kaggle="bob/corpus-set"), dest)
    assert (again / "t.csv").read_bytes() == b"x,y\n1,2\n"
    assert emu.dataset_downloads() == ["bob/corpus-set"] * 2


def test_a_changed_drive_download_is_downloaded_again(drive_emulator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gpupool.spec import InputSpec
    from tests.providers.colab_support import make_provider

    item = drive_emulator.state.create("vocab.txt", content=b"words")
    colab = make_provider(drive_emulator, tmp_path)
    dest = tmp_path / "cache"
    got = colab.download_input(InputSpec(drive=item.id), dest)
    assert colab.download_input(InputSpec(drive=item.id), dest) == got
    downloads = len(drive_emulator.calls("files.download"))
    _tamper(got, b"WORDS")
    assert colab.download_input(InputSpec(drive=item.id), dest).read_bytes() == b"words"
    assert len(drive_emulator.calls("files.download")) > downloads
