"""A loopback Kaggle API for the real kagglesdk / kaggle clients; it really runs pushed kernels.

    with KaggleEmulator(username="alice", key="k", max_gpu_sessions=2) as emu:
        client = emu.sdk_client()    # or emu.connect(monkeypatch, via="endpoint"|"proxy")
        client.kernels.kernels_api_client.save_kernel(request)
        emu.wait("alice/my-job").outputs    # {"model.pt": Path(...)}

See emulator.py (the object; live_kernels(), live_datasets(), charged_sessions() count what a
client left behind and what was charged), faults.py (Fault.rate_limit(), .http(), .hang(),
.reset(), .truncate(), .extra_fields(), .status(); http/hang/reset with after=True strike once
the request took effect), state.py (Config: caps, quota, timing, expose_session_id,
private_dataset_quota_bytes) and runner.py (the fake /kaggle).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .emulator import KaggleEmulator
from .faults import Fault
from .state import Config

__all__ = ["Config", "Fault", "KaggleEmulator", "kaggle_emulator"]


@pytest.fixture
def kaggle_emulator(tmp_path: Path) -> Iterator[KaggleEmulator]:
    """A started emulator (user "alice", key "alice-key"); kernel roots live under tmp_path."""
    with KaggleEmulator(workdir=tmp_path / "kaggle-emulator") as emulator:
        yield emulator
