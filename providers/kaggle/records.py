"""What the Kaggle provider keeps locally per attempt, under its data dir.

``attempts/<id>.json`` holds the attempt's kernel (owner, slug, version), its session id when
Kaggle told one, and ``unconfirmed_since`` (epoch seconds) while a push that got no clear
answer is being resolved. ``logs/<id>.log`` is the session's log, saved before its kernel is
deleted, so ``gpupool logs`` keeps working afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Records:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def read(self, attempt_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(attempt_id).read_text())
        except (OSError, ValueError):
            return None

    def write(self, attempt_id: str, record: dict[str, Any]) -> None:
        """Replace the record atomically (a crash leaves the old one or the new one)."""
        path = self._path(attempt_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def log_path(self, attempt_id: str) -> Path:
        return self.data_dir / "logs" / f"{attempt_id}.log"

    def save_log(self, attempt_id: str, lines: list[str]) -> None:
        path = self.log_path(attempt_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")

    def _path(self, attempt_id: str) -> Path:
        return self.data_dir / "attempts" / f"{attempt_id}.json"
