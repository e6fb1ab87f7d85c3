"""Bring-your-own scripts: the runtime contract (checkpoint_dir, resumed, request_snapshot)."""

from __future__ import annotations

from gpupool import runtime
from gpupool.runtime import Session


def make_session(tmp_path, **env: str) -> Session:
    return Session(env={runtime.ENV_SESSION_DIR: str(tmp_path / "session"), **env},
                   install_sigterm=False)


def test_checkpoint_dir_and_resumed_come_from_the_supervisor(tmp_path):
    folder = tmp_path / "code" / "checkpoints"
    session = make_session(tmp_path, GPUPOOL_CHECKPOINT_DIR=str(folder), GPUPOOL_RESUMED="1")
    assert session.checkpoint_dir == folder
    assert session.resumed is True


def test_no_checkpoint_folder_declared_means_none_and_not_resumed(tmp_path):
    session = make_session(tmp_path)
    assert session.checkpoint_dir is None
    assert session.resumed is False
    assert make_session(tmp_path, GPUPOOL_RESUMED="0").resumed is False


def test_request_snapshot_leaves_a_new_request_file_each_time(tmp_path):
    session = make_session(tmp_path)
    request = session.session_dir / runtime.SNAPSHOT_REQUEST
    session.request_snapshot()
    first = request.stat()
    session.request_snapshot()
    second = request.stat()
    assert (first.st_ino, first.st_mtime_ns) != (second.st_ino, second.st_mtime_ns)
    assert not list(session.session_dir.glob("*.tmp"))  # written by rename, never torn
