"""What gpupool pushes to Kaggle per attempt: a slug, the kernel's metadata, its bootstrap script.

The kernel's code is a small generated script that carries the attempt's marker (which
datasets hold its code and checkpoint, how to run it). It finds those datasets under
``$KAGGLE_ROOT/input`` (``/kaggle/input``; both layouts, since Kaggle changed the mount layout
in 2026), checks the code archives' sha256, puts the shipped runtime on ``sys.path`` and hands
over to ``gpupool.session.bootstrap`` with the session folder in ``/kaggle/working/gpupool``,
whose files become the session's output. The deadline is computed inside the kernel at its
start, because the time spent queued is unknown. Every name the script shares with gpupool
comes from ``gpupool.session.contract``: imported once the runtime is unpacked, and its
``extract_tar`` copied into the script to unpack the runtime. Nothing secret goes into the
script or the metadata: the session needs no Kaggle credentials.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any

from gpupool.lifecycle import AttemptState
from gpupool.session import contract

CODE_FILE, RUNTIME_FILE, CHECKPOINT_FILE = "code.gpupool", "runtime.gpupool", "checkpoint.gpupool"
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
    """The dataset of a kernel's own (the checkpoint it resumes from; 6-50 characters)."""
    return kernel if len(kernel) >= 6 else f"{kernel}-input"


def gpu_kind(accelerator: str | None) -> str | None:
    if not accelerator:
        return None
    return ACCELERATOR_KINDS.get(accelerator.lower(), accelerator.lower())


def save_request(*, owner: str, slug: str, script: str, sources: list[str], private: bool,
                 accelerator: str | None, internet: bool, timeout_seconds: int) -> Any:
    """The ``ApiSaveKernelRequest`` (kernel-metadata.json's fields) that pushes and runs it;
    ``sources`` are the datasets it mounts ("owner/slug[/version]")."""
    from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelRequest

    request = ApiSaveKernelRequest()
    request.slug, request.new_title, request.text = f"{owner}/{slug}", slug, script
    request.language, request.kernel_type = "python", "script"
    request.is_private = private
    request.enable_gpu = accelerator is not None
    request.enable_internet = internet
    request.dataset_data_sources = list(sources)
    request.session_timeout_seconds = timeout_seconds
    if accelerator:
        request.machine_shape = accelerator
    return request


def render_script(marker: dict[str, Any]) -> str:
    """The kernel's code: a fixed bootstrap with the attempt's marker filled in, and the
    contract's ``extract_tar`` (the one function it needs before the runtime is unpacked)."""
    return BOOTSTRAP.replace("@MARKER@", json.dumps(json.dumps(marker, sort_keys=True))) \
        .replace("@SUBDIR@", json.dumps(SESSION_SUBDIR)) \
        .replace("@EXTRACT_TAR@\n", inspect.getsource(contract.extract_tar))


def script_marker(script: str) -> dict[str, Any]:
    """The marker a rendered script carries (for tests and for reading a pushed kernel)."""
    line = next(line for line in script.splitlines() if line.startswith("MARKER = "))
    return dict(json.loads(json.loads(line.removeprefix("MARKER = json.loads(").rstrip(")"))))


def marker(attempt_id: str, *, code: str, code_files: dict[str, str], checkpoint: str | None,
           checkpoint_name: str | None, setup: str | None, run: str, env: dict[str, str],
           session_seconds: float, margin: float,
           inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the kernel is told: ``code`` ("owner/slug" holding ``code_files``, name -> sha256:
    the bundle and the runtime), ``checkpoint`` ("owner/slug" holding the one to resume
    from), how to run the session (``margin``: seconds kept before the end, see
    ``contract.deadline_margin``), and the experiment's data plan ``inputs`` (see
    gpupool.session.inputs.prepare)."""
    return {
        "attempt": attempt_id, "code": code, "code_files": code_files, "bundle": CODE_FILE,
        "runtime": RUNTIME_FILE, "checkpoint": checkpoint, "checkpoint_file": CHECKPOINT_FILE,
        "checkpoint_name": checkpoint_name, "setup": setup, "run": run, "env": env,
        "session_seconds": session_seconds, "margin": margin, "inputs": inputs or {},
    }


BOOTSTRAP = '''\
"""gpupool session bootstrap (generated; holds no credentials). Finds this attempt's code and
checkpoint among the mounted datasets, checks them, then runs gpupool.session.bootstrap with
its session folder in /kaggle/working."""
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MARKER = json.loads(@MARKER@)
SUBDIR = @SUBDIR@


def locate_dataset(inputs_root, ref):
    owner, slug = ref.split("/")[:2]
    for path in (inputs_root / "datasets" / owner / slug, inputs_root / slug):
        if path.is_dir():
            return path
    return None


def mounted(inputs_root, ref, what):
    path = locate_dataset(inputs_root, ref)
    if path is None:
        sys.exit(f"gpupool: the {what} dataset {ref} is not mounted under {inputs_root}")
    return path


def check_sha256(path, expected):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        sys.exit(f"gpupool: {path.name} does not match its sha256 (damaged in transit)")


# gpupool.session.contract.extract_tar, copied in: the runtime that holds it is not unpacked yet
@EXTRACT_TAR@


def main():
    start = time.time()
    kaggle = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))
    inputs, config = kaggle / "input", MARKER
    code = mounted(inputs, config["code"], "code")
    for name, sha256 in config["code_files"].items():
        check_sha256(code / name, sha256)
    scratch = Path(tempfile.mkdtemp(prefix="gpupool-"))
    runtime = extract_tar(code / config["runtime"], scratch / "runtime")
    sys.path.insert(0, str(runtime))
    from gpupool.manifest import read_local, verify_local
    from gpupool.session import bootstrap, contract
    from gpupool.session import inputs as session_inputs

    session = kaggle / "working" / SUBDIR
    session.mkdir(parents=True, exist_ok=True)
    deadline, hard_end = contract.session_deadline(start, config["session_seconds"], config["margin"])
    env = dict(config["env"], **{contract.ENV_SESSION_DIR: str(session), contract.ENV_LOG_EVENTS: "1"})
    if config.get("checkpoint"):
        held = mounted(inputs, config["checkpoint"], "checkpoint")
        unpacked = extract_tar(held / config["checkpoint_file"], scratch / "restore")
        restore = unpacked / config["checkpoint_name"]
        verify_local(restore, read_local(restore))
        env[contract.ENV_RESTORE_DIR] = str(restore)
    try:
        env.update(session_inputs.prepare(config.get("inputs", {}),
                                          lambda ref: locate_dataset(inputs, ref), scratch))
    except session_inputs.InputProblem as err:  # recorded: retrying cannot bring the input back
        if err.transient:
            sys.exit(f"gpupool: {err}")
        (session / contract.EXIT_FILE).write_text(
            json.dumps({"outcome": contract.OUTCOME_INPUT_PROBLEM, "message": str(err)}))
        sys.exit(f"gpupool: {err}")
    session_config = contract.session_config(
        session_dir=str(session), bundle=str(code / config["bundle"]), setup=config.get("setup"),
        run=config["run"], env=env, runtime_path=str(runtime), deadline=deadline, hard_end=hard_end)
    path = scratch / contract.SESSION_CONFIG
    path.write_text(json.dumps(session_config))
    bootstrap.main(str(path))
    shutil.rmtree(session / contract.CODE_DIR, ignore_errors=True)  # outputs hold checkpoints, not code
    result = contract.read_json(session / contract.EXIT_FILE) or {}
    sys.exit(0 if contract.ended_cleanly(result) else 1)


main()
'''
