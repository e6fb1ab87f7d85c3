"""What runs inside the Colab notebook (standard library only; its source is a notebook cell).

It talks to Drive's v2 REST API with a bearer token: on Colab the token comes from
``google.colab.auth.authenticate_user()`` (the person running the notebook consents in the
browser), never from gpupool's saved credentials, which stay on the user's machine.

Layout of an attempt's Drive folder::

    runtime.tar.gz  bundle.tar.gz  restore/<ckpt>/...   uploaded by the scheduler
    <name>.ipynb                                       this notebook
    status.json     one file, rewritten in place (files.update) at every heartbeat:
                    {"state": starting|running|no-gpu|failed|finished, "time", "step", ...}
    checkpoints/<ckpt>/...  files first, manifest.json last (a checkpoint without one is torn)
    log.txt         the session's output, uploaded on every heartbeat
    cancel.json     written by the scheduler to ask the session to stop

``run_attempt(params)`` does it all: GPU check, download, restore, supervise
``gpupool.bootstrap`` under the session deadline, while a background thread uploads new
checkpoints and heartbeats.
"""

import http.client
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from pathlib import Path

FOLDER_MIME = "application/vnd.google-apps.folder"
RETRY_STATUSES = {429, 500, 502, 503, 504}


class DriveFailure(RuntimeError):
    pass


class DriveREST:
    """A minimal Drive v2 client over ``http.client`` with retries and resumable uploads."""

    def __init__(self, base_url, token, chunk=8 * 1024 * 1024, retries=6, sleep=time.sleep):
        self.base = base_url.rstrip("/")
        self.token = token  # a callable returning a valid access token
        self.chunk = chunk
        self.retries = retries
        self.sleep = sleep

    def _send(self, method, url, body=b"", headers=None):
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.netloc, timeout=120)
        try:
            path = parts.path + ("?" + parts.query if parts.query else "")
            head = {"Authorization": "Bearer " + self.token(), **(headers or {})}
            conn.request(method, path, body=body, headers=head)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def request(self, method, url, body=b"", headers=None, ok=(200, 201, 204, 308)):
        for attempt in range(self.retries + 1):
            try:
                status, head, data = self._send(method, url, body, headers)
            except (OSError, http.client.HTTPException) as err:
                status, head, data = None, {}, str(err).encode()
            if status in ok:
                return status, head, data
            if not _retryable(status, data) or attempt == self.retries:
                raise DriveFailure(f"{method} {url.split('?')[0]}: {status} {data[:300]!r}")
            self.sleep(min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def json(self, method, path, payload=None, **query):
        url = f"{self.base}/drive/v2/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        body = json.dumps(payload).encode() if payload is not None else b""
        _, _, data = self.request(method, url, body, {"Content-Type": "application/json"})
        return json.loads(data) if data else {}

    def children(self, parent, title=None):
        q = f"'{parent}' in parents and trashed=false"
        if title is not None:
            q += " and title='" + title.replace("\\", "\\\\").replace("'", "\\'") + "'"
        items, token = [], None
        while True:
            query = {"q": q, "maxResults": 1000, **({"pageToken": token} if token else {})}
            page = self.json("GET", "files", **query)
            items += [i for i in page.get("items", []) if title is None or i["title"] == title]
            token = page.get("nextPageToken")
            if not token:
                return items

    def find(self, parent, title):
        found = sorted(self.children(parent, title), key=lambda i: i.get("modifiedDate", ""))
        return found[-1] if found else None

    def folder(self, parent, title):
        existing = self.find(parent, title)
        if existing:
            return existing["id"]
        body = {"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent}]}
        return self.json("POST", "files", body)["id"]

    def download(self, file_id, target):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        _, _, data = self.request("GET", f"{self.base}/drive/v2/files/{file_id}?alt=media")
        target.write_bytes(data)
        return target

    def download_tree(self, folder_id, target):
        for item in self.children(folder_id):
            path = Path(target) / item["title"]
            if item["mimeType"] == FOLDER_MIME:
                self.download_tree(item["id"], path)
            else:
                self.download(item["id"], path)

    def upload(self, parent, title, path, mime="application/octet-stream"):
        """A new file through a resumable session: chunks, resumed after a dropped connection."""
        size = os.path.getsize(path)
        meta = {"title": title, "mimeType": mime, "parents": [{"id": parent}]}
        return self._resumable("POST", f"{self.base}/upload/drive/v2/files?uploadType=resumable",
                               meta, path, size, mime)

    def update(self, file_id, path, mime="application/json"):
        size = os.path.getsize(path)
        return self._resumable("PUT", f"{self.base}/upload/drive/v2/files/{file_id}"
                                      "?uploadType=resumable", {}, path, size, mime)

    def _resumable(self, method, url, meta, path, size, mime):
        head = {"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Type": mime,
                "X-Upload-Content-Length": str(size)}
        _, resp_head, _ = self.request(method, url, json.dumps(meta).encode(), head, ok=(200,))
        session = resp_head["location"]
        offset = 0
        with open(path, "rb") as handle:
            while True:
                handle.seek(offset)
                data = handle.read(self.chunk)
                end = offset + len(data) - 1
                content_range = f"bytes {offset}-{end}/{size}" if data else f"bytes */{size}"
                try:
                    status, head2, body = self._send("PUT", session, data,
                                                     {"Content-Range": content_range})
                except (OSError, http.client.HTTPException):
                    offset = self._progress(session, size)  # resume where Drive stopped
                    continue
                if status in (200, 201):
                    return json.loads(body)
                if status == 308:
                    offset = _range_end(head2.get("range"))
                    continue
                if not _retryable(status, body):
                    raise DriveFailure(f"upload of {path}: {status} {body[:300]!r}")
                self.sleep(1.0)
                offset = self._progress(session, size)

    def _progress(self, session, size):
        status, head, body = self.request("PUT", session, b"", {"Content-Range": f"bytes */{size}"},
                                          ok=(200, 201, 308))
        return _range_end(head.get("range")) if status == 308 else size


def _retryable(status, body):
    if status is None or status in RETRY_STATUSES:
        return True
    return status == 403 and (b"rateLimitExceeded" in body or b"userRateLimitExceeded" in body)


def _range_end(header):
    """The next byte to send after ``Range: bytes=0-n`` (0 when nothing arrived)."""
    if not header:
        return 0
    return int(header.rsplit("-", 1)[1]) + 1


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


class Reporter:
    """Writes ``status.json`` (one file, updated in place) and the log to the attempt folder."""

    def __init__(self, drive, folder, work):
        self.drive, self.folder, self.work = drive, folder, Path(work)
        self.status_id = None
        self.log_id = None
        self.started = time.time()

    def status(self, state, **fields):
        doc = {"state": state, "time": time.time(), "started": self.started, **fields}
        path = self.work / "status.json"
        path.write_text(json.dumps(doc))
        if self.status_id is None:
            self.status_id = self.drive.upload(self.folder, "status.json", path,
                                               "application/json")["id"]
        else:
            self.drive.update(self.status_id, path)

    def log(self, path):
        if not Path(path).exists():
            return
        if self.log_id is None:
            self.log_id = self.drive.upload(self.folder, "log.txt", path, "text/plain")["id"]
        else:
            self.drive.update(self.log_id, path, "text/plain")


class Uploader(threading.Thread):
    """Background thread: new ``ckpt-*`` folders go to Drive (manifest last), plus heartbeats."""

    def __init__(self, drive, folder, session_dir, reporter, every, on_cancel):
        super().__init__(name="gpupool-uploader", daemon=True)
        self.drive, self.folder, self.session_dir = drive, folder, Path(session_dir)
        self.reporter, self.every, self.on_cancel = reporter, every, on_cancel
        self.done = set()
        self.stopping = threading.Event()
        self.checkpoints_id = None
        self.error = None

    def run(self):
        while not self.stopping.wait(self.every):
            try:
                self.beat()
            except Exception as err:  # noqa: BLE001 - keep training; report on the next beat
                self.error = err
                print(f"[gpupool] Drive sync failed, will retry: {err}", flush=True)

    def beat(self, state="running", **extra):
        self.sync()
        self.reporter.log(self.session_dir / "log.txt")
        self.reporter.status(state, **progress(self.session_dir), **extra)
        if state == "running" and self.drive.find(self.folder, "cancel.json"):
            self.on_cancel()

    def sync(self):
        root = self.session_dir / "checkpoints"
        ready = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").is_file())
        for path in ready:
            if path.name not in self.done:
                try:
                    self.push(path)
                except FileNotFoundError:
                    continue  # pruned by the runtime meanwhile: a newer one exists
                self.done.add(path.name)

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


def progress(session_dir):
    """The newest step the runtime reported (events.jsonl)."""
    try:
        lines = (Path(session_dir) / "events.jsonl").read_text().splitlines()[-200:]
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step") is not None:
            return {"step": record["step"], "total": record.get("total"),
                    "heartbeat": record.get("time")}
    return {}


def prepare(drive, p, work):
    """Download the runtime, the code and the checkpoint to restore; returns the session config."""
    folder = p["ATTEMPT_FOLDER_ID"]
    for title in ("runtime.tar.gz", "bundle.tar.gz"):
        item = drive.find(folder, title)
        if item is None:
            raise DriveFailure(f"{title} is missing from the attempt's Drive folder")
        drive.download(item["id"], work / title)
    with tarfile.open(work / "runtime.tar.gz") as tar:
        tar.extractall(work / "runtime", filter="data")
    sys.path.insert(0, str(work / "runtime"))
    env = dict(p["SESSION_ENV"])
    session_dir = work / "session"
    env["GPUPOOL_SESSION_DIR"] = str(session_dir)
    if p.get("RESTORE_NAME"):
        env["GPUPOOL_RESTORE_DIR"] = str(restore(drive, folder, p["RESTORE_NAME"], work))
    now = time.time()
    hard_end = now + float(p["SESSION_SECONDS"])
    env["GPUPOOL_DEADLINE"] = f"{hard_end - float(p['DEADLINE_MARGIN']):.3f}"
    return {"session_dir": str(session_dir), "bundle": str(work / "bundle.tar.gz"),
            "setup": p.get("SETUP"), "run": p["RUN"], "hard_end": hard_end,
            "runtime_path": str(work / "runtime"), "env": env}


def restore(drive, folder, name, work):
    restore_root = drive.find(folder, "restore")
    item = drive.find(restore_root["id"], name) if restore_root else None
    if item is None:
        raise DriveFailure(f"checkpoint {name} to restore is missing from Drive")
    target = work / "restore" / name
    drive.download_tree(item["id"], target)
    from gpupool.manifest import read_local, verify_local

    verify_local(target, read_local(target))
    print(f"[gpupool] restored checkpoint {name}", flush=True)
    return target


def supervise(config, work, uploader_factory):
    """Run gpupool.bootstrap under the session's deadline while checkpoints stream to Drive."""
    path = work / "session.json"
    path.write_text(json.dumps(config))
    session_dir = Path(config["session_dir"])
    session_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in [config["runtime_path"], os.environ.get("PYTHONPATH")] if x))
    # `python` in the run command is the kernel's own interpreter (with torch on Colab)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    with open(session_dir / "log.txt", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "gpupool.bootstrap", str(path)],
                                   cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    uploader = uploader_factory(session_dir, lambda: process.terminate())
    uploader.beat()
    uploader.start()
    process.wait()
    uploader.stopping.set()
    uploader.join()
    return uploader, session_dir


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
    """Runtime, code and restore checkpoint from Drive; "failed" is reported if that breaks."""
    try:
        return prepare(drive, p, work)
    except Exception as err:
        reporter.status("failed", message=f"could not prepare the session: {err}")
        raise


def train(drive, reporter, p, work, config):
    def make_uploader(session_dir, on_cancel):
        return Uploader(drive, p["ATTEMPT_FOLDER_ID"], session_dir, reporter,
                        float(p["HEARTBEAT_SECONDS"]), on_cancel)

    uploader, session_dir = supervise(config, work, make_uploader)
    exit_file = session_dir / "exit.json"
    ended = json.loads(exit_file.read_text()) if exit_file.exists() else {}
    uploader.beat("finished", returncode=ended.get("returncode"), outcome=ended.get("outcome"))
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
