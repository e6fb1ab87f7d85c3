"""What gpupool learns about Colab's unpublished limits: cooldowns after "no GPU" reports, and
the attempts' Drive records, both as small JSON files under the provider's data dir."""

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


class Cooldowns:
    """Per account: Colab is unavailable until a time, and why (survives restarts)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def get(self, account: str, now: float) -> tuple[float, str] | None:
        entry = (read_json(self.path) or {}).get(account)
        if not entry or entry["until"] <= now:
            return None
        return float(entry["until"]), str(entry["reason"])

    def set(self, account: str, until: float, reason: str) -> None:
        data = read_json(self.path) or {}
        previous = data.get(account, {}).get("until", 0)
        data[account] = {"until": max(until, previous), "reason": reason}
        write_json(self.path, data)


class AttemptRecords:
    """Where each attempt lives on Drive (folder, notebook), written once at submit."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, attempt_id: str) -> dict | None:
        return read_json(self.root / f"{attempt_id}.json")

    def put(self, attempt_id: str, record: dict) -> None:
        write_json(self.root / f"{attempt_id}.json", record)
