"""What runs inside the Colab notebook (standard library only; its source is a notebook cell).

It talks to Drive's v2 REST API with a bearer token: on Colab the token comes from
``google.colab.auth.authenticate_user()`` (the person running the notebook consents in the
browser), never from gpupool's saved credentials, which stay on the user's machine.

Layout of an attempt's Drive folder::

    runtime.tar.gz  bundle.tar.gz  restore/<ckpt>/...   uploaded by the scheduler (restore/ is
                                                       deleted once the session pushed its own)
    <name>.ipynb                                       this notebook
    status.json     one file, rewritten in place (files.update) at every heartbeat:
                    {"state": starting|running|no-gpu|failed|drive-error|stopped|finished,
                     "time", "step", ...}
    checkpoints/<ckpt>/...  files first, manifest.json last (a checkpoint without one is torn);
                    only the newest ``KEEP_LAST`` are kept (older ones deleted for good)
    log.txt         the session's output, uploaded with each sync
    cancel.json     written by the scheduler to ask the session to stop

``run_attempt(params)`` does it all: GPU check, download, restore, supervise
``gpupool.session.bootstrap`` under the session deadline. The names it shares with gpupool
come from ``gpupool.session.contract``, whose source is the notebook cell before this one, so
they are there before the runtime is downloaded. Two background threads: the uploader sends
new checkpoints and the log; the heartbeat writes the status and looks for the stop request,
so it never waits behind a transfer. A stop request, or uploads that cannot work (Drive full,
credentials refused), stop the training (it saves on SIGTERM) and are reported at once.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

try:  # modules in the package; in the notebook, the cells before this one define these
    from gpupool.session.contract import (
        CHECKPOINTS_DIR,
        ENV_RESTORE_DIR,
        ENV_SESSION_DIR,
        EXIT_FILE,
        OUTCOME_INPUT_PROBLEM,
        SESSION_CONFIG,
        extract_tar,
        input_env_name,
        last_event,
        read_json,
        session_config,
        session_deadline,
    )

    from .agent_drive import DriveFailure, DriveREST
except ImportError:
    pass

STOP_FILE = "cancel.json"


# -- the session ----------------------------------------------------------------------------

def colab_token():
    """A token function from the Colab user's own sign-in (asks in the browser once)."""
    from google.colab import auth  # only on Colab

    auth.authenticate_user()
    import google.auth
    import google.auth.transport.requests

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/drive"])

    def token():
        if not creds.valid:
            creds.refresh(google.auth.transport.requests.Request())
        return creds.token

    return token


def gpu_present(probe):
    try:
        return subprocess.run(probe, shell=True, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class StopRequested(Exception):
    """gpupool asked this session to stop (``cancel.json``), or removed the attempt's files."""


class Reporter:
    """Writes ``status.json`` (one file, updated in place) and the log to the attempt folder."""

    def __init__(self, drive, folder, work):
        self.drive, self.folder, self.work = drive, folder, Path(work)
        self.status_id = None
        self.log_id = None
        self.started = time.time()

    def status(self, state, **fields):
        """Write the status; raises ``StopRequested`` when gpupool has removed it (the attempt
        ended on gpupool's side and was cleaned up)."""
        doc = {"state": state, "time": time.time(), "started": self.started, **fields}
        path = self.work / "status.json"
        path.write_text(json.dumps(doc))
        try:
            if self.status_id is None:
                self.status_id = self.drive.upload(self.folder, "status.json", path,
                                                   "application/json")["id"]
            else:
                self.drive.update(self.status_id, path)
        except DriveFailure as err:
            if err.kind == "gone":
                raise StopRequested("the attempt's files were removed from Drive") from None
            raise

    def stop_requested(self):
        """True once gpupool has written ``cancel.json`` into the attempt folder."""
        return self.drive.find(self.folder, STOP_FILE) is not None

    def log(self, path):
        if not Path(path).exists():
            return
        if self.log_id is None:
            self.log_id = self.drive.upload(self.folder, "log.txt", path, "text/plain")["id"]
        else:
            self.drive.update(self.log_id, path, "text/plain")


class Uploader(threading.Thread):
    """Background thread: new ``ckpt-*`` folders go to Drive (manifest last), then older ones
    beyond ``keep_last`` are deleted there; the log follows. It never reports status: the
    heartbeat does, so a slow or failing transfer never delays it.

    ``error`` is the last failure (retried at the next round); ``fatal`` one that retrying
    cannot fix (Drive full, credentials refused): the uploader stops and the heartbeat
    reports it."""

    def __init__(self, drive, folder, session_dir, reporter, every, keep_last=None):
        super().__init__(name="gpupool-uploader", daemon=True)
        self.drive, self.folder, self.session_dir = drive, folder, Path(session_dir)
        self.reporter, self.every, self.keep_last = reporter, every, keep_last
        self.done = []  # names of checkpoints complete on Drive, oldest first
        self.stopping = threading.Event()
        self.checkpoints_id = None
        self.error = None
        self.fatal = None
        self.restore_freed = False

    def run(self):
        while not self.fatal and not self.stopping.wait(self.every):
            self.round()

    def round(self):
        """One sync and log upload; failures are kept for the heartbeat, never raised."""
        try:
            self.sync()
            self.reporter.log(self.session_dir / "log.txt")
            self.error = None
        except Exception as err:  # noqa: BLE001 - keep training; the heartbeat reports it
            self.error = err
            if getattr(err, "kind", None) in ("storage-full", "credentials"):
                self.fatal = err
            print(f"[gpupool] Drive sync failed: {err}", flush=True)

    def sync(self):
        root = self.session_dir / CHECKPOINTS_DIR
        ready = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").is_file())
        for path in ready:
            if path.name in self.done or (self.done and path.name < self.done[-1]):
                continue  # already on Drive, or older than one there (it would be pruned)
            try:
                self.push(path)
            except FileNotFoundError:
                continue  # pruned by the runtime meanwhile: a newer one exists
            self.done.append(path.name)
            self.prune()
            self.free_restore()

    def push(self, path):
        if self.checkpoints_id is None:
            self.checkpoints_id = self.drive.folder(self.folder, "checkpoints")
        target = self.drive.folder(self.checkpoints_id, path.name)
        manifest = json.loads((path / "manifest.json").read_text())
        for entry in manifest["files"]:
            parent = target
            for part in entry["path"].split("/")[:-1]:
                parent = self.drive.folder(parent, part)
            self.drive.upload(parent, entry["path"].rsplit("/", 1)[-1], path / entry["path"])
        self.drive.upload(target, "manifest.json", path / "manifest.json", "application/json")
        print(f"[gpupool] checkpoint {path.name} uploaded to Drive", flush=True)

    def free_restore(self):
        """Delete gpupool's copy of the checkpoint this session started from, once one of its
        own is on Drive: a run of the notebook again starts from that one (see
        ``restore_source``), and the copy counted against the quota."""
        if not self.restore_freed:
            item = self.drive.find(self.folder, "restore")
            if item is not None:
                self.drive.delete(item["id"])
            self.restore_freed = True

    def prune(self):
        """Delete (for good: trash still counts against the quota) every checkpoint folder on
        Drive older than the newest ``keep_last`` complete ones; never the newest."""
        if not self.keep_last or not self.done:
            return
        keep = set(self.done[-int(self.keep_last):])
        for item in self.drive.children(self.checkpoints_id):
            if item["title"] not in keep and item["title"] < self.done[-1]:
                self.drive.delete(item["id"])


class Heartbeat(threading.Thread):
    """Background thread: every ``every`` seconds, the small ``status.json`` (progress, and why
    uploads fail) and a look for gpupool's stop request. ``on_stop()`` stops training
    when gpupool asks, or when the uploads cannot work (Drive full, credentials refused)."""

    def __init__(self, reporter, session_dir, uploader, every, on_stop, state="running"):
        super().__init__(name="gpupool-heartbeat", daemon=True)
        self.reporter, self.session_dir, self.uploader = reporter, Path(session_dir), uploader
        self.every, self.on_stop, self.state = every, on_stop, state
        self.stopping = threading.Event()
        self.stopped_because = None

    def run(self):
        while not self.stopping.wait(self.every):
            self.safe_beat()

    def halt(self):
        self.stopping.set()
        self.join()

    def safe_beat(self):
        try:
            self.beat()
        except Exception as err:  # noqa: BLE001 - try again at the next beat
            print(f"[gpupool] heartbeat failed, will retry: {err}", flush=True)

    def beat(self):
        if self.stopped_because is not None:  # keep saying why, while the last upload runs
            state, fields = self.stopped_because
            return self.reporter.status(state, **progress(self.session_dir), **fields)
        fatal = self.uploader.fatal if self.uploader else None
        if fatal is not None:
            return self.stop("drive-error", reason=fatal.kind,
                             message=f"checkpoints cannot be saved to Drive: {fatal}")
        failing = self.uploader.error if self.uploader else None
        extra = {"upload_error": str(failing)} if failing else {}
        try:
            self.reporter.status(self.state, **progress(self.session_dir), **extra)
            if self.reporter.stop_requested():
                self.stop("stopped", message="gpupool asked this session to stop")
        except StopRequested as err:
            self.stop("stopped", message=str(err))

    def stop(self, state, **fields):
        """Stop training once, and say why in the status from now on."""
        self.stopped_because = (state, fields)
        print(f"[gpupool] stopping: {fields.get('message')}", flush=True)
        if state == "stopped" and self.uploader:  # given up: nobody collects what comes now
            self.uploader.stopping.set()
        self.on_stop()
        try:
            self.reporter.status(state, **progress(self.session_dir), **fields)
        except StopRequested:
            pass


def progress(session_dir):
    """The newest step the runtime reported (events.jsonl)."""
    record = last_event(session_dir)
    if not record:
        return {}
    return {"step": record["step"], "total": record.get("total"), "heartbeat": record.get("time")}


def prepare(drive, p, work):
    """Download the runtime, the code and the checkpoint to restore; returns the session config."""
    folder = p["ATTEMPT_FOLDER_ID"]
    for title in ("runtime.tar.gz", "bundle.tar.gz"):
        item = drive.find(folder, title)
        if item is None:
            raise DriveFailure(f"{title} is missing from the attempt's Drive folder")
        drive.download(item["id"], work / title)
    runtime = extract_tar(work / "runtime.tar.gz", work / "runtime")
    sys.path.insert(0, str(runtime))
    env = dict(p["SESSION_ENV"])
    env.update(bring_inputs(drive, p.get("INPUTS") or {}, work / "gpupool-inputs"))
    session_dir = work / "session"
    env[ENV_SESSION_DIR] = str(session_dir)
    restored = restore(drive, folder, p.get("RESTORE_NAME"), work)
    if restored is not None:
        env[ENV_RESTORE_DIR] = str(restored)
    # counted from now: the time before a person opened the notebook is not this session's
    deadline, hard_end = session_deadline(time.time(), p["SESSION_SECONDS"], p.get("DEADLINE_MARGIN"))
    return session_config(session_dir=str(session_dir), bundle=str(work / "bundle.tar.gz"),
                          setup=p.get("SETUP"), run=p["RUN"], env=env, runtime_path=str(runtime),
                          deadline=deadline, hard_end=hard_end)


def bring_inputs(drive, plan, root):
    """Copy every input onto the VM's disk through the Drive API (not the FUSE mount), verify
    it, make it read-only; returns ``{GPUPOOL_INPUT_<NAME>: path}``. Raises
    ``gpupool.session.inputs.InputProblem`` naming an input that is missing or wrong."""
    from gpupool.session import inputs as session_inputs

    env = {}
    for name, item in plan.items():
        try:
            path = _bring_input(drive, session_inputs, name, item, Path(root) / name)
        except DriveFailure as err:
            if err.kind != "gone":
                raise
            raise session_inputs.InputProblem(f"input {name!r}: Drive file or folder "
                                              f"{item.get('id')} is gone ({err})") from None
        env[input_env_name(name)] = str(path)
        print(f"[gpupool] input {name} ready at {path}", flush=True)
    return env


def _bring_input(drive, session_inputs, name, item, target):
    """One input of ``bring_inputs``, on the VM's disk and read-only; returns its path."""
    if item["kind"] == "drive_content":
        drive.download_tree(item["id"], target)
        ready = session_inputs.prepare({name: {"kind": "dataset", "ref": item["id"], "packed": True}},
                                       _always(target), target.parent)
        path = Path(next(iter(ready.values())))
    elif item["kind"] == "drive" and item.get("is_dir"):
        drive.download_tree(item["id"], target)
        path = target
    elif item["kind"] == "drive":
        path = drive.download(item["id"], target / item["title"])
    elif item["kind"] == "url":
        path = session_inputs.fetch(item["url"], item.get("sha256"), target)
    else:
        raise session_inputs.InputProblem(f"input {name!r}: unknown kind {item['kind']!r}")
    for file in [target, *target.rglob("*")]:
        if file.is_file():
            file.chmod(0o444)
    return path


def _always(folder):
    """``locate`` for session_inputs.prepare: the input was just downloaded to ``folder``."""
    return lambda ref: folder


def restore_source(drive, folder, name):
    """The Drive folder and name of the checkpoint to start from: this attempt's own newest
    complete one (the notebook run again after a disconnect), else the one gpupool put in
    ``restore/`` (deleted once this session has pushed its own), else None."""
    own = drive.find(folder, "checkpoints")
    complete = [i for i in (drive.children(own["id"]) if own else [])
                if i["title"].startswith("ckpt-") and drive.find(i["id"], "manifest.json")]
    if complete:
        newest = max(complete, key=lambda i: i["title"])
        return newest["id"], newest["title"]
    restore_root = drive.find(folder, "restore") if name else None
    item = drive.find(restore_root["id"], name) if restore_root else None
    if name and item is None:
        raise DriveFailure(f"checkpoint {name} to restore is missing from Drive")
    return (item["id"], name) if item else None


def restore(drive, folder, name, work):
    """Download and verify the checkpoint to start from; its local folder, or None."""
    source = restore_source(drive, folder, name)
    if source is None:
        return None
    item_id, name = source
    target = work / "restore" / name
    drive.download_tree(item_id, target)
    from gpupool.manifest import read_local, verify_local

    verify_local(target, read_local(target))
    print(f"[gpupool] restored checkpoint {name}", flush=True)
    return target


def supervise(config, work, make_threads):
    """Run gpupool.session.bootstrap under the session's deadline while checkpoints stream to Drive
    (uploader thread) and the status is reported (heartbeat thread); returns both threads,
    the heartbeat still running (the caller stops it after the last upload)."""
    path = work / SESSION_CONFIG
    path.write_text(json.dumps(config))
    session_dir = Path(config["session_dir"])
    session_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in [config["runtime_path"], os.environ.get("PYTHONPATH")] if x))
    # `python` in the run command is the kernel's own interpreter (with torch on Colab)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    with open(session_dir / "log.txt", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "gpupool.session.bootstrap", str(path)],
                                   cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    # SIGTERM: the supervisor has the training script save, then exit
    uploader, heartbeat = make_threads(session_dir, lambda: process.terminate())
    heartbeat.safe_beat()
    uploader.start()
    heartbeat.start()
    process.wait()
    uploader.stopping.set()
    uploader.join()
    return uploader, heartbeat, session_dir  # the heartbeat beats on while the last upload runs


def connect(p):
    """The Drive client and status reporter of this attempt; reports "starting"."""
    work = Path(p["WORK_DIR"]) / p["ATTEMPT_ID"]
    work.mkdir(parents=True, exist_ok=True)
    token = (lambda: p["DRIVE_TOKEN"]) if p.get("DRIVE_TOKEN") else colab_token()
    drive = DriveREST(p["DRIVE_BASE_URL"], token, chunk=int(p["UPLOAD_CHUNK_BYTES"]))
    reporter = Reporter(drive, p["ATTEMPT_FOLDER_ID"], work)
    reporter.status("starting")
    return drive, reporter, work


def check_gpu(p, reporter):
    """Stop with a clear message (and tell gpupool) when Colab gave no GPU."""
    if not p.get("GPU_REQUIRED") or gpu_present(p["GPU_PROBE"]):
        return
    reporter.status("no-gpu", message="Colab assigned no GPU (usage limits, or the runtime "
                                      "type is not GPU)")
    raise SystemExit("No GPU in this runtime: choose Runtime > Change runtime type > GPU, "
                     "or Colab's usage limits are reached; gpupool will run this elsewhere.")


def install(drive, reporter, p, work):
    """Runtime, code and restore checkpoint from Drive, while "starting" heartbeats go on (a
    large restore takes a while); "failed" is reported if that breaks."""
    beats = Heartbeat(reporter, work / "session", None, float(p["HEARTBEAT_SECONDS"]),
                      lambda: None, state="starting")
    beats.start()
    try:
        config = prepare(drive, p, work)
    except Exception as err:
        beats.halt()
        # InputProblem's class comes from the runtime prepare() unpacks, hence by name: an
        # input gone or wrong is reported apart, so gpupool fails the run instead of retrying
        if type(err).__name__ == "InputProblem" and not getattr(err, "transient", False):
            reporter.status(OUTCOME_INPUT_PROBLEM, message=f"an input is unusable in the session: {err}")
        else:
            reporter.status("failed", message=f"could not prepare the session: {err}")
        raise
    beats.halt()
    return config


def check_stop(reporter):
    """Before training: a session gpupool already gave up on does not start."""
    if reporter.stop_requested():
        reporter.status("stopped", message="gpupool asked this session to stop before it trained")
        raise SystemExit("gpupool has stopped this attempt (it ended or was cancelled); "
                         "nothing to run here. You can close this notebook.")


def train(drive, reporter, p, work, config):
    every = float(p["HEARTBEAT_SECONDS"])

    def make_threads(session_dir, stop_training):
        uploader = Uploader(drive, p["ATTEMPT_FOLDER_ID"], session_dir, reporter, every,
                            keep_last=p.get("KEEP_LAST"))
        return uploader, Heartbeat(reporter, session_dir, uploader, every, stop_training)

    check_stop(reporter)
    uploader, heartbeat, session_dir = supervise(config, work, make_threads)
    given_up = (heartbeat.stopped_because or ("",))[0] == "stopped"
    if uploader.fatal is None and not given_up:
        uploader.round()  # the checkpoint saved on the way out, while the heartbeat goes on
    heartbeat.stopping.set()
    heartbeat.join()
    ended = read_json(session_dir / EXIT_FILE) or {}
    if heartbeat.stopped_because is None and uploader.fatal is not None:
        heartbeat.safe_beat()  # the upload failed for good on the way out: say why
    state, fields = heartbeat.stopped_because or ("finished", {})
    try:
        who = {"stopped_by": ended["stopped_by"]} if "stopped_by" in ended else {}
        reporter.status(state, **progress(session_dir), **fields, returncode=ended.get("returncode"),
                        outcome=ended.get("outcome"), **who)
    except StopRequested:
        pass
    print(f"[gpupool] session finished: {ended}", flush=True)
    return ended


def run_attempt(p):
    drive, reporter, work = connect(p)
    check_gpu(p, reporter)
    config = install(drive, reporter, p, work)
    return train(drive, reporter, p, work, config)


def release_runtime():
    """Give the GPU back when done (Colab only)."""
    try:
        from google.colab import runtime
    except ImportError:
        return
    runtime.unassign()
