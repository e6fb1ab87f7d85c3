"""What gpupool pushes to Kaggle per attempt: a slug, the kernel's metadata, its bootstrap script.

The kernel's code is a small generated script. It finds gpupool's inputs by a marker file under
``$KAGGLE_ROOT/input`` (``/kaggle/input``; searched, since Kaggle changed the mount layout in
2026), puts the shipped runtime on ``sys.path`` and hands over to ``gpupool.bootstrap`` with the
session folder in ``/kaggle/working/gpupool``, whose files become the session's output. The
deadline is computed inside the kernel at its start, because the time spent queued is unknown.
Nothing secret goes into the script or the metadata: the session needs no Kaggle credentials.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from gpupool.lifecycle import AttemptState

MARKER = "gpupool-input.json"
SESSION_SUBDIR = "gpupool"  # under /kaggle/working
MAX_SLUG = 50

# Every KernelWorkerStatus, mapped once. COMPLETE and ERROR are refined by the session's
# exit.json: without one, Kaggle ended the session and it is LOST (see outputs.ending).
STATUS_MAP: dict[str, AttemptState] = {
    "QUEUED": AttemptState.SUBMITTED,
    "NEW_SCRIPT": AttemptState.SUBMITTED,
    "RUNNING": AttemptState.RUNNING,
    "CANCEL_REQUESTED": AttemptState.RUNNING,  # still stopping; its end comes next
    "COMPLETE": AttemptState.SUCCEEDED,
    "ERROR": AttemptState.FAILED,
    "CANCEL_ACKNOWLEDGED": AttemptState.CANCELLED,
}

ACCELERATOR_KINDS = {  # machine_shape -> the GPU kind experiments ask for
    "nvidiateslat4": "t4", "nvidiateslat4highmem": "t4", "nvidiateslap100": "p100",
    "nvidiateslaa100": "a100", "nvidial4": "l4", "nvidial4x1": "l4", "nvidiah100": "h100",
    "nvidiartxpro6000": "rtx pro 6000",
}


def kernel_slug(prefix: str, attempt_id: str) -> str:
    """A Kaggle-safe slug for the attempt: lowercase [a-z0-9-], at most 50 characters, the
    same every time (so a re-submit finds the kernel it already pushed)."""
    clean = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", attempt_id.lower())).strip("-")
    slug = f"{prefix}-{clean}" if clean else prefix
    if len(slug) <= MAX_SLUG:
        return slug
    digest = hashlib.sha256(attempt_id.encode()).hexdigest()[:8]
    return f"{slug[:MAX_SLUG - 9].rstrip('-')}-{digest}"


def dataset_slug(kernel: str) -> str:
    """The inputs dataset of a kernel (Kaggle wants 6-50 characters)."""
    return kernel if len(kernel) >= 6 else f"{kernel}-input"


def gpu_kind(accelerator: str | None) -> str | None:
    if not accelerator:
        return None
    return ACCELERATOR_KINDS.get(accelerator.lower(), accelerator.lower())


def save_request(*, owner: str, slug: str, script: str, dataset: str, private: bool,
                 accelerator: str | None, internet: bool, timeout_seconds: int,
                 input_sources: list[str] | None = None) -> Any:
    """The ``ApiSaveKernelRequest`` (kernel-metadata.json's fields) that pushes and runs it;
    ``input_sources`` are the experiment's input datasets ("owner/slug[/version]")."""
    from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelRequest

    request = ApiSaveKernelRequest()
    request.slug, request.new_title, request.text = f"{owner}/{slug}", slug, script
    request.language, request.kernel_type = "python", "script"
    request.is_private = private
    request.enable_gpu = accelerator is not None
    request.enable_internet = internet
    request.dataset_data_sources = [f"{owner}/{dataset}", *(input_sources or [])]
    request.session_timeout_seconds = timeout_seconds
    if accelerator:
        request.machine_shape = accelerator
    return request


def render_script(attempt_id: str) -> str:
    """The kernel's code: a fixed bootstrap with only the attempt id filled in."""
    return BOOTSTRAP.replace("@ATTEMPT@", json.dumps(attempt_id)).replace("@MARKER@", json.dumps(MARKER)) \
        .replace("@SUBDIR@", json.dumps(SESSION_SUBDIR))


def marker(attempt_id: str, *, bundle: str, runtime: str, checkpoint: str | None,
           checkpoint_name: str | None, setup: str | None, run: str, env: dict[str, str],
           session_seconds: float, margin: float,
           inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The marker file's content: which inputs are whose, and how to run the session;
    ``inputs`` is the experiment's data plan (see gpupool.session_inputs.prepare)."""
    return {
        "attempt": attempt_id, "bundle": bundle, "runtime": runtime, "checkpoint": checkpoint,
        "checkpoint_name": checkpoint_name, "setup": setup, "run": run, "env": env,
        "session_seconds": session_seconds, "margin": margin, "inputs": inputs or {},
    }


BOOTSTRAP = '''\
"""gpupool session bootstrap (generated; holds no credentials). Finds this attempt's inputs by
their marker file, then runs gpupool.bootstrap with its session folder in /kaggle/working."""
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ATTEMPT = @ATTEMPT@
MARKER = @MARKER@
SUBDIR = @SUBDIR@


def find_inputs(root):
    for path in sorted(root.rglob(MARKER)):
        try:
            config = json.loads(path.read_text())
        except ValueError:
            continue
        if config.get("attempt") == ATTEMPT:
            return path.parent, config
    sys.exit(f"gpupool: no {MARKER} for attempt {ATTEMPT} under {root}")


def locate_dataset(inputs_root, ref):
    owner, slug = ref.split("/")[:2]
    for path in (inputs_root / "datasets" / owner / slug, inputs_root / slug):
        if path.is_dir():
            return path
    return None


def extract(archive, target):
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(target, filter="data")
    return target


def main():
    start = time.time()
    kaggle = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))
    inputs, config = find_inputs(kaggle / "input")
    scratch = Path(tempfile.mkdtemp(prefix="gpupool-"))
    runtime = extract(inputs / config["runtime"], scratch / "runtime")
    sys.path.insert(0, str(runtime))
    from gpupool import bootstrap, session_inputs
    from gpupool.manifest import read_local, verify_local

    session = kaggle / "working" / SUBDIR
    session.mkdir(parents=True, exist_ok=True)
    hard_end = start + float(config["session_seconds"])
    env = dict(config["env"])
    env.update(GPUPOOL_SESSION_DIR=str(session), GPUPOOL_LOG_EVENTS="1",
               GPUPOOL_DEADLINE="%.3f" % (hard_end - float(config["margin"])))
    if config.get("checkpoint"):
        restore = extract(inputs / config["checkpoint"], scratch / "restore") / config["checkpoint_name"]
        verify_local(restore, read_local(restore))
        env["GPUPOOL_RESTORE_DIR"] = str(restore)
    try:
        env.update(session_inputs.prepare(config.get("inputs", {}),
                                          lambda ref: locate_dataset(kaggle / "input", ref), scratch))
    except session_inputs.InputProblem as err:
        sys.exit(f"gpupool: {err}")
    session_config = {
        "session_dir": str(session), "bundle": str(inputs / config["bundle"]),
        "setup": config.get("setup"), "run": config["run"], "hard_end": hard_end,
        "runtime_path": str(runtime), "env": env,
    }
    (scratch / "session.json").write_text(json.dumps(session_config))
    bootstrap.main(str(scratch / "session.json"))
    shutil.rmtree(session / "code", ignore_errors=True)  # outputs hold checkpoints, not code
    result = json.loads((session / "exit.json").read_text())
    done = result.get("outcome") in ("done", "yield") or result.get("returncode") in (0, 75)
    sys.exit(0 if done else 1)


main()
'''
