"""Faults a tester found in inputs:, each one member of a kind: blank or null sources, bad
names and missing paths reported together at their own lines, unreadable local data, and
caches of downloaded inputs that must notice changed bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from gpupool.errors import InputUnavailable, SpecError
from gpupool.inputs import fetch_url, first_unreadable, reuse_sealed, write_sealed
from gpupool.spec import load_experiment
from tests.test_inputs import Opener

HEAD = "name: with-inputs\nworkdir: work\nrun: python check.py\nproviders: [local]\ninputs:\n"


def experiment(tmp: Path, body: str) -> Path:
    """An experiment file whose inputs: section is ``body`` (starting at line 6)."""
    (tmp / "work").mkdir(exist_ok=True)
    path = tmp / "exp.yaml"
    path.write_text(HEAD + body)
    return path


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        load_experiment(path)
    assert caught.value.exit_code == 2
    return caught.value.problems


# -- blank and null sources ------------------------------------------------------------------

@pytest.mark.parametrize("line, field", [
    ('  w: {drive: ""}\n', "inputs.w.drive (line 6)"),
    ('  w: {local: ""}\n', "inputs.w.local (line 6)"),
    ('  w: {kaggle: "  "}\n', "inputs.w.kaggle (line 6)"),
    ('  w: {url: ""}\n', "inputs.w.url (line 6)"),
    ('  w: ""\n', "inputs.w.local (line 6)"),  # was: the experiment file's own folder
])
def test_a_blank_source_is_refused_at_its_field(tmp_path: Path, line: str, field: str) -> None:
    problems = problems_of(experiment(tmp_path, line))
    assert any(where == field and "is empty" in what for where, what in problems), problems


def test_an_input_with_no_value_says_it_needs_a_source(tmp_path: Path) -> None:
    problems = problems_of(experiment(tmp_path, "  w:\n"))
    assert problems == [("inputs.w (line 6)", "needs a source: a local path, or "
                                               "{local|kaggle|drive|url: ...}")]


@pytest.mark.parametrize("body, field, message", [
    ("  w: 5\n", "inputs.w (line 6)", "must be a local path or {local|kaggle|drive|url: ...}, not 5"),
    ("  w: [a]\n", "inputs.w (line 6)", "must be a local path or"),
    ("  w: {local: 3}\n", "inputs.w.local (line 6)", "must be text (a path, dataset, id or address)"),
    ("", "inputs (line 5)", "must map input names to sources"),  # `inputs:` left empty
])
def test_a_source_of_the_wrong_shape_is_explained_not_pydantic(
        tmp_path: Path, body: str, field: str, message: str) -> None:
    problems = problems_of(experiment(tmp_path, body))
    assert any(where == field and message in what for where, what in problems), problems
    assert not any("instance of" in what or "class" in what for _, what in problems), problems


def test_a_tilde_in_a_local_path_is_the_home_folder(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "x").write_bytes(b"x")
    (home / "other").mkdir()
    (home / "other" / "x").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    spec = load_experiment(experiment(tmp_path, "  w: ~/data\n  v: {local: ~/other/x}\n"))
    assert spec.inputs["w"].local == home / "data"
    assert spec.inputs["v"].local == home / "other" / "x"


# -- every bad input at its own line, in one error ----------------------------------------------

def test_every_bad_input_is_reported_at_its_own_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    problems = problems_of(experiment(tmp_path, "  good: data\n  bad-name: data\n"
                                                "  gone: {local: missing}\n  2x: data\n"))
    where = [w for w, _ in problems]
    assert "inputs.bad-name (line 7)" in where and "inputs.2x (line 9)" in where
    assert any(w == "inputs.gone.local (line 8)" and "does not exist" in what
               for w, what in problems), problems


# -- unreadable local data -----------------------------------------------------------------

def _unreadable_for_this_user(path: Path) -> bool:
    if os.access(path, os.R_OK):
        return False
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            path.open("rb").close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("what", ["file", "folder", "file in a folder"])
def test_an_unreadable_local_input_is_refused_up_front(tmp_path: Path, what: str) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "x").write_bytes(b"x")
    target = {"file": data / "sub" / "x", "folder": data / "sub",
              "file in a folder": data / "sub" / "x"}[what]
    source = "data/sub/x" if what == "file" else "data"
    target.chmod(0)
    try:
        if not _unreadable_for_this_user(target):
            pytest.skip("this user (root?) reads files whatever their mode")
        problems = problems_of(experiment(tmp_path, f"  w: {{local: {source}}}\n"))
        assert problems == [("inputs.w.local (line 6)",
                             f"{target} is not readable by this user (check its permissions)")]
    finally:
        target.chmod(0o755)


def test_unreadable_files_deep_in_a_folder_are_found(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk itself, for users (root) whom the mode cannot stop: os.access is asked."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one", "a/b/two", "a/b/three"):
        (tmp_path / name).write_bytes(b"x")
    denied = tmp_path / "a" / "b" / "three"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != denied and real_access(p, mode))
    assert first_unreadable(tmp_path / "a") == denied
    assert first_unreadable(tmp_path / "a" / "one") is None


# -- caches of downloaded inputs ------------------------------------------------------------

def _tamper(path: Path, data: bytes, *, keep_mtime: bool) -> None:
    before = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(0o444)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_changed_url_cache_is_fetched_again(tmp_path: Path, keep_mtime: bool) -> None:
    body = b"vocabulary\n" * 10
    digest = hashlib.sha256(body).hexdigest()
    opener = Opener(body)
    path = fetch_url("https://example.org/vocab.txt", digest, tmp_path, opener)
    assert path.stat().st_mode & 0o777 == 0o444  # read-only in the cache
    _tamper(path, b"VOCABULARY\n" * 10, keep_mtime=keep_mtime)  # same size
    again = fetch_url("https://example.org/vocab.txt", digest, tmp_path, opener)
    assert again.read_bytes() == body and opener.calls == 2


def test_a_changed_url_cache_without_a_declared_sha256_is_fetched_again(tmp_path: Path) -> None:
    opener = Opener(b"remote bytes")
    path = fetch_url("https://example.org/v.txt", None, tmp_path, opener)
    _tamper(path, b"REMOTE BYTES", keep_mtime=True)
    assert fetch_url("https://example.org/v.txt", None, tmp_path, opener).read_bytes() == b"remote bytes"
    assert opener.calls == 2


def test_an_unchanged_url_cache_is_not_fetched_again(tmp_path: Path) -> None:
    opener = Opener(b"abc")
    path = fetch_url("https://example.org/v.txt", None, tmp_path, opener)
    path.chmod(0o444)  # touched (ctime moves) but the same bytes: re-hashed once, kept
    assert fetch_url("https://example.org/v.txt", None, tmp_path, opener) == path
    assert fetch_url("https://example.org/v.txt", None, tmp_path, opener) == path
    assert opener.calls == 1


def test_a_changed_url_cache_that_cannot_be_fetched_fails_clearly(tmp_path: Path) -> None:
    body = b"abc"
    path = fetch_url("https://example.org/v.txt", hashlib.sha256(body).hexdigest(), tmp_path,
                     Opener(body))
    _tamper(path, b"xyz", keep_mtime=True)

    def offline(url: str) -> io.BytesIO:
        raise OSError("network is unreachable")

    with pytest.raises(InputUnavailable, match="cannot fetch https://example.org/v.txt"):
        fetch_url("https://example.org/v.txt", hashlib.sha256(body).hexdigest(), tmp_path, offline)
    assert not path.exists()  # the changed bytes are not left to be used


@pytest.mark.parametrize("change", ["bytes", "bytes, mtime put back", "file removed", "file added"])
def test_a_changed_download_cache_is_dropped(tmp_path: Path, change: str) -> None:
    """The Kaggle and Drive download caches (``v<N>.done``, ``<key>.done``) use this rule."""
    folder, done = tmp_path / "v1", tmp_path / "v1.done"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"abc")
    write_sealed(done, {"version": 1}, folder)
    assert json.loads(done.read_text())["version"] == 1
    assert reuse_sealed(folder, done)
    target = folder / "sub" / "a.bin"
    if change.startswith("bytes"):
        _tamper(target, b"xyz", keep_mtime="mtime" in change)
    elif change == "file removed":
        target.unlink()
    else:
        (folder / "extra").write_bytes(b"")
    assert not reuse_sealed(folder, done)
    assert not folder.exists() and not done.exists()


# -- teaching inputs: in the help --------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help_teaches_inputs(args: list[str]) -> None:
    from click.testing import CliRunner

    from gpupool.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "inputs:" in text and "$GPUPOOL_INPUT_<NAME>" in text and '"Data: inputs:"' in text


def test_cli_reports_every_bad_input_with_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = experiment(tmp_path, '  w: {drive: ""}\n  bad-name: work\n  gone: missing\n  n:\n')
    env = {**os.environ, "GPUPOOL_DATA_DIR": str(tmp_path / "data")}
    env.pop("GPUPOOL_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "gpupool", "run", "--detach", str(path)],
                            env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    for where in ("inputs.w.drive (line 6)", "inputs.bad-name (line 7)",
                  "inputs.gone.local (line 8)", "inputs.n (line 9)"):
        assert where in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / "data").exists()


# -- in the session: what fails the run at once, and what may work on another try ----------------

def test_a_session_input_problem_says_whether_another_try_can_help(tmp_path: Path) -> None:
    """A dataset not attached is final (the run fails once); a fetch cut on the way is not."""
    from gpupool.session.inputs import InputProblem, fetch, prepare

    with pytest.raises(InputProblem) as gone:
        prepare({"corpus": {"kind": "dataset", "ref": "bob/set", "packed": False}},
                lambda ref: None, tmp_path)
    assert not gone.value.transient and "not attached" in str(gone.value)
    with pytest.raises(InputProblem) as cut:
        fetch("http://127.0.0.1:9/x.txt", None, tmp_path / "url")  # port 9: nothing listens
    assert cut.value.transient and "cannot fetch" in str(cut.value)
