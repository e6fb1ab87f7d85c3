"""inputs: in the experiment file: validation with lines, content hashing and its cache, URL
fetches, and the local provider using inputs in place."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from gpupool.errors import InputUnavailable, SpecError
from gpupool.inputs import (
    HashCache,
    InputSources,
    fetch_url,
    hash_content,
    pack_content,
    source_key,
)
from gpupool.lifecycle import ExperimentState
from gpupool.pool import Pool
from gpupool.session.contract import input_env_name
from gpupool.session.inputs import InputProblem, prepare
from gpupool.settings import PoolSettings
from gpupool.spec import load_experiment
from tests.helpers import drive_until_done

CHECK_SCRIPT = '''\
import hashlib, os, pathlib, sys
for name in sorted(k for k in os.environ if k.startswith("GPUPOOL_INPUT_")):
    p = pathlib.Path(os.environ[name])
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    print("INPUT", name, len(files), digest.hexdigest(), flush=True)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
'''


def write(tmp: Path, inputs: object, **extra: object) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    (work / "check.py").write_text(CHECK_SCRIPT)
    data = {"name": "with-inputs", "workdir": "work", "run": "python check.py",
            "providers": ["local"], "inputs": inputs, **extra}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_data(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        load_experiment(path)
    assert caught.value.exit_code == 2
    return caught.value.problems


# -- the experiment file ---------------------------------------------------------------------

def test_each_kind_of_source_is_read(tmp_path: Path) -> None:
    make_data(tmp_path / "data", {"a.bin": b"a"})
    spec = load_experiment(write(tmp_path, {
        "train": "data", "corpus": {"kaggle": "alice/corpus-set@3"},
        "shards": {"drive": "1AbC"}, "vocab": {"url": "https://example.org/v.txt", "sha256": "A" * 64}}))
    kinds = {name: item.kind for name, item in spec.inputs.items()}
    assert kinds == {"train": "local", "corpus": "kaggle", "shards": "drive", "vocab": "url"}
    assert spec.inputs["train"].local == (tmp_path / "data").resolve()  # relative to the file
    assert spec.inputs["vocab"].sha256 == "a" * 64


def test_missing_local_path_names_the_field_and_line(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {"train": {"local": "nowhere"}}))
    assert len(problems) == 1
    where, what = problems[0]
    assert where.startswith("inputs.train.local (line ")
    assert "nowhere does not exist" in what


@pytest.mark.parametrize("name", ["2data", "my-data", "da ta", "ümlaut"])
def test_input_name_must_be_an_identifier(tmp_path: Path, name: str) -> None:
    make_data(tmp_path / "data", {"a": b"a"})
    where, what = problems_of(write(tmp_path, {name: "data"}))[0]
    assert where == f"inputs.{name} (line 7)" and "not a valid input name" in what


@pytest.mark.parametrize("inputs, message", [
    ({"a": "data", "b": "data"}, "same place as input 'a'"),
    ({"a": "data", "b": "data/sub"}, "same place as input 'a'"),  # one inside the other
    ({"data": "data", "DATA": "other"}, "same session path and variable"),
    ({"a": {"kaggle": "bob/set-one"}, "b": {"kaggle": "bob/set-one@2"}}, "same place as input 'a'"),
])
def test_two_inputs_at_one_path_are_refused(tmp_path: Path, inputs: dict, message: str) -> None:
    make_data(tmp_path / "data", {"sub/x": b"x"})
    make_data(tmp_path / "other", {"y": b"y"})
    problems = problems_of(write(tmp_path, inputs))
    assert any(message in what and "(line " in where for where, what in problems), problems


@pytest.mark.parametrize("item, message", [
    ({"kaggle": "not a ref"}, "owner/slug"),
    ({"url": "ftp://example.org/x"}, "https://"),
    ({"url": "https://example.org/x", "sha256": "abc"}, "64 hexadecimal"),
    ({"local": "data", "kaggle": "bob/set-one"}, "exactly one source"),
    ({}, "exactly one source"),
    ({"local": "data", "sha256": "a" * 64}, "url inputs only"),
])
def test_malformed_sources_are_refused_with_their_line(tmp_path: Path, item: dict, message: str) -> None:
    make_data(tmp_path / "data", {"x": b"x"})
    problems = problems_of(write(tmp_path, {"train": item}))
    assert any(message in what and where.startswith("inputs.train") and "(line " in where
               for where, what in problems), problems


# -- hashing and its cache -----------------------------------------------------------------

def test_unchanged_content_is_not_read_again(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": os.urandom(1000), "sub/b.bin": os.urandom(500)})
    cache_file = tmp_path / "cache.json"
    first_cache = HashCache(cache_file)
    first = hash_content(data, first_cache)
    assert first_cache.hashed_bytes == 1500 and first.size == 1500
    again = HashCache(cache_file)  # a new process: the cache comes from disk
    assert hash_content(data, again) == first and again.hashed_bytes == 0
    (data / "a.bin").write_bytes(os.urandom(1000))  # same size, new mtime: re-read that file only
    os.utime(data / "a.bin", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = HashCache(cache_file)
    assert hash_content(data, changed).sha256 != first.sha256
    assert changed.hashed_bytes == 1000


def test_packing_refuses_a_file_changed_after_hashing(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": b"1" * 100})
    content = hash_content(data, HashCache(tmp_path / "cache.json"))
    (data / "a.bin").write_bytes(b"2" * 100)
    with pytest.raises(InputUnavailable, match="changed while it was being packed"):
        pack_content(content, tmp_path / "out.tar")


def test_packed_content_is_verified_in_the_session(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": b"abc", "sub/b.bin": b"defg"})
    content = hash_content(data, HashCache(tmp_path / "cache.json"))
    mount = tmp_path / "mount"
    (mount / "data").mkdir(parents=True)
    with tarfile.open(pack_content(content, tmp_path / "data.tar")) as tar:
        tar.extractall(mount / "data", filter="data")
    (mount / "gpupool-content.json").write_text(__import__("json").dumps(content.listing()))
    plan = {"train": {"kind": "dataset", "ref": "alice/x", "packed": True}}
    env = prepare(plan, lambda ref: mount, tmp_path / "scratch")
    assert env == {"GPUPOOL_INPUT_TRAIN": str(mount / "data")}
    (mount / "data" / "sub" / "b.bin").write_bytes(b"defX")  # a byte changed in transit
    with pytest.raises(InputProblem, match="sub/b.bin does not match its sha256"):
        prepare(plan, lambda ref: mount, tmp_path / "scratch")
    with pytest.raises(InputProblem, match="not attached"):
        prepare(plan, lambda ref: None, tmp_path / "scratch")


# -- urls ----------------------------------------------------------------------------------

class Opener:
    """The transport fetch_url uses: counts requests, serves fixed bytes."""

    def __init__(self, data: bytes):
        self.data, self.calls = data, 0

    def __call__(self, url: str) -> io.BytesIO:
        self.calls += 1
        return io.BytesIO(self.data)


def test_url_is_fetched_once_and_verified(tmp_path: Path) -> None:
    body = b"vocabulary\n" * 10
    digest = hashlib.sha256(body).hexdigest()
    opener = Opener(body)
    path = fetch_url("https://example.org/vocab.txt", digest, tmp_path, opener)
    assert path.read_bytes() == body and path.name == "vocab.txt"
    assert fetch_url("https://example.org/vocab.txt", digest, tmp_path, opener) == path
    assert opener.calls == 1
    with pytest.raises(InputUnavailable, match="not the 0000"):
        fetch_url("https://example.org/other.txt", "0" * 64, tmp_path, opener)
    assert not list(tmp_path.rglob("other.txt*"))  # nothing half-kept


# -- the local provider --------------------------------------------------------------------

def make_pool(tmp: Path) -> Pool:
    return Pool(PoolSettings(data_dir=tmp / "pool", providers={"local": {"gpus": "none"}}))


def test_local_session_reads_inputs_in_place(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": b"abc", "sub/b.bin": b"defg"})
    body = b"remote file"
    path = write(tmp_path, {"train": "data", "vocab": {
        "url": "https://example.org/vocab.txt", "sha256": hashlib.sha256(body).hexdigest()}})
    pool = make_pool(tmp_path)
    pool.provider("local").open_url = Opener(body)  # type: ignore[attr-defined,assignment]
    experiment = pool.submit(load_experiment(path), path)
    done = drive_until_done(pool, experiment.id, timeout=120)
    assert done.state == ExperimentState.SUCCEEDED
    log = pool.provider("local").logs(pool.state.attempts(experiment.id)[0])
    expected = hashlib.sha256(b"abc" + b"defg").hexdigest()
    assert f"INPUT {input_env_name('train')} 2 {expected}" in log
    assert f"INPUT {input_env_name('vocab')} 1 {hashlib.sha256(body).hexdigest()}" in log
    assert (data / "a.bin").read_bytes() == b"abc"  # used in place, untouched


def test_wrong_sha256_fails_before_anything_is_placed(tmp_path: Path) -> None:
    path = write(tmp_path, {"vocab": {"url": "https://example.org/v.txt", "sha256": "1" * 64}})
    pool = make_pool(tmp_path)
    pool.provider("local").open_url = Opener(b"other bytes")  # type: ignore[attr-defined]
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.vocab.sha256 (line ") and "not the 1111" in what
    assert pool.state.experiments() == []


def test_a_drive_input_with_no_drive_account_is_refused_up_front(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """local brings Drive inputs by asking the Drive adapter to download them; with no Drive
    credentials configured that cannot work, so nothing is placed (exit 2, field and line)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, {"shards": {"drive": "1AbCdEf"}})
    pool = make_pool(tmp_path)
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.shards.drive (line ") and "cannot read Drive input 1AbCdEf" in what
    assert "gpupool auth colab" in what and pool.state.experiments() == []


def test_local_input_deleted_later_fails_the_attempt_with_the_reason(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", {"a.bin": b"abc"})
    path = write(tmp_path, {"train": "data"}, limits={"retries_on_error": 0})
    pool = make_pool(tmp_path)
    experiment = pool.submit(load_experiment(path), path)
    for item in data.iterdir():
        item.unlink()
    data.rmdir()
    done = drive_until_done(pool, experiment.id, timeout=60)
    assert done.state == ExperimentState.FAILED
    attempts = pool.state.attempts(experiment.id)
    assert len(attempts) == 1 and "no longer exists" in (attempts[0].end_reason or "")


def test_a_kaggle_input_with_no_kaggle_account_is_refused_up_front(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    for name in [k for k in os.environ if k.startswith("KAGGLE_") and k != "KAGGLE_CONFIG_DIR"]:
        monkeypatch.delenv(name)
    path = write(tmp_path, {"corpus": {"kaggle": "bob/corpus-set"}})
    pool = make_pool(tmp_path)
    with pytest.raises(SpecError) as caught:
        pool.submit(load_experiment(path), path)
    where, what = caught.value.problems[0]
    assert where.startswith("inputs.corpus.kaggle (line ") and "cannot read Kaggle dataset" in what
    assert pool.state.experiments() == []


def test_a_kind_no_installed_adapter_downloads_is_refused_up_front(tmp_path: Path) -> None:
    spec = load_experiment(write(tmp_path, {"shards": {"drive": "1AbCdEf"}}))
    sources = InputSources(tmp_path / "cache", lambda kind: None)
    assert sources.check(spec, set()) == [(("inputs", "shards", "drive"), "no configured provider "
                                           "can read drive inputs (is its adapter installed?)")]
    with pytest.raises(InputUnavailable, match="no configured provider downloads drive inputs"):
        sources.fetch("shards", spec.inputs["shards"])


def test_versions_of_one_source_share_its_cache_folder() -> None:
    assert source_key("bob/corpus-set@3") == source_key("bob/corpus-set")
    assert source_key("bob/corpus-set") != source_key("bob/corpus_set")  # hashed, not only cleaned
    assert "/" not in source_key("bob/corpus-set")


@pytest.mark.parametrize("name", ["experiment.yaml", "kaggle-dataset.yaml", "drive.yaml"])
def test_examples_are_valid(name: str) -> None:
    spec = load_experiment(Path(__file__).parents[1] / "configs" / "examples" / "inputs" / name)
    assert spec.inputs and spec.workdir.name == "code"


def test_cli_run_reports_bad_inputs_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": "missing-folder", "shards": {"drive": "1AbC"}})
    env = {**os.environ, "GPUPOOL_DATA_DIR": str(tmp_path / "data")}
    env.pop("GPUPOOL_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "gpupool", "run", "--detach", str(path)],
                            env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "inputs.train.local (line" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    path = write(tmp_path, {"shards": {"drive": "1AbC"}})
    result = subprocess.run([sys.executable, "-m", "gpupool", "run", "--detach", str(path)],
                            env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "inputs.shards.drive (line" in result.stderr and "cannot read Drive" in result.stderr
