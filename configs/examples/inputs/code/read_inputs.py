"""Reads every input gpupool brought into the session (paths in GPUPOOL_INPUT_<NAME>)."""

import os
from pathlib import Path

for name in sorted(k for k in os.environ if k.startswith("GPUPOOL_INPUT_")):
    path = Path(os.environ[name])
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    print(f"{name} = {path}: {len(files)} file(s), {sum(p.stat().st_size for p in files)} bytes")
