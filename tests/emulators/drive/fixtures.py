"""pytest fixture: a running :class:`DriveEmulator` per test, checked for internal errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import DriveEmulator


@pytest.fixture(name="drive_emulator")
def drive_emulator_fixture() -> Iterator[DriveEmulator]:
    """Import ``drive_emulator_fixture`` into a test module; tests ask for ``drive_emulator``."""
    with DriveEmulator() as emulator:
        yield emulator
    assert not emulator.errors, "the Drive emulator failed:\n" + "\n".join(emulator.errors)
