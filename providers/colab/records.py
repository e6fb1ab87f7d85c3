"""The attempts' Drive records, as small JSON files under the provider's data dir. (Colab's
cool-downs after "no GPU" reports are the state database's, like every provider's.)"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class AttemptRecords:
    """Where each attempt lives on Drive (folder, notebook), written once at submit."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, attempt_id: str) -> dict | None:
        return read_json(self.root / f"{attempt_id}.json")

    def put(self, attempt_id: str, record: dict) -> None:
        write_json(self.root / f"{attempt_id}.json", record)
