"""The RPC endpoints: one function per `POST {base}/v1/<service>/<method>`.

Each takes (emulator, authenticated username, request JSON) and returns the response JSON as a plain
dict (hand-written camelCase; kagglesdk's own serializers are not used since they are buggy for
durations), or raises ApiError / returns a Redirect. Fields left at their proto default are omitted,
as Kaggle does (so a QUEUED status is sent as no status at all).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .state import NOT_READY_STATUS, Blob, Dataset, DatasetVersion, Kernel, Session

if TYPE_CHECKING:
    from .emulator import KaggleEmulator

Handler = Callable[["KaggleEmulator", str, dict[str, Any]], Any]
HANDLERS: dict[tuple[str, str], Handler] = {}
NO_AUTH_METHODS = frozenset({"IntrospectToken"})


class ApiError(Exception):
    """An HTTP error answered as Kaggle does: JSON {"code", "message"} with that HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Redirect:
    location: str


def rpc(service: str, method: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        HANDLERS[(service, method)] = func
        return func

    return register


def duration(seconds: float) -> str:
    """Protobuf JSON duration: "3600s", "3600.500s"."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.3f}s"


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- kernels


def _split_ref(user: str, ref: str) -> tuple[str, str]:
    owner, _, slug = ref.rpartition("/")
    return (owner or user), slug


def _find_kernel(emu: KaggleEmulator, user: str, owner: str, slug: str) -> Kernel:
    kernel = emu.kernels.get((owner, slug))
    if kernel is None or kernel.deleted or (kernel.is_private and owner != user):
        # Kaggle answers 403 (not 404) for kernels that are unknown or not yours.
        raise ApiError(403, "Permission 'kernels.get' was denied")
    return kernel


def _find_session(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> Session:
    kernel = _find_kernel(emu, user, body.get("userName") or user, body.get("kernelSlug", ""))
    session = kernel.version(body.get("versionLabel"))
    if session is None:
        raise ApiError(404, f"Kernel version {body.get('versionLabel')} not found")
    return session


def _push_target(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> tuple[str, str]:
    if body.get("id"):
        kernel = next((k for k in emu.kernels.values() if k.id == body["id"]), None)
        if kernel is None:
            raise ApiError(404, f"Kernel id {body['id']} not found")
        return kernel.owner, kernel.slug
    if not body.get("slug"):
        raise ApiError(400, "A kernel id or slug is required")
    return _split_ref(user, body["slug"])


def _refusal(emu: KaggleEmulator, user: str, body: dict[str, Any], gpu: bool) -> str:
    """The `error` text of a push Kaggle turns down, or "" when it is accepted. Quota and the
    GPU session limit are the pushing user's own."""
    cfg = emu.config
    if body.get("kernelExecutionType") == "QUICK_SAVE" or not gpu:
        return ""
    if emu.gpu_seconds_used(user) >= emu.gpu_quota_seconds(user):
        return (
            f"GPU quota exceeded: your weekly GPU quota refreshes at {iso(cfg.quota_refresh_time)}"
        )
    live = sum(1 for s in emu.sessions.values() if s.gpu and s.live and s.owner == user)
    if live >= cfg.max_gpu_sessions:
        return f"Maximum batch GPU session count of {cfg.max_gpu_sessions} reached"
    return ""


def _is_gpu(body: dict[str, Any]) -> bool:
    shape = str(body.get("machineShape") or "").lower()
    return bool(body.get("enableGpu")) or shape.startswith("nvidia")


def _invalid_sources(emu: KaggleEmulator, body: dict[str, Any]) -> dict[str, list[str]]:
    bad_datasets = [
        r for r in body.get("datasetDataSources", []) if emu.find_dataset_version(r) is None
    ]
    bad_kernels = [
        r for r in body.get("kernelDataSources", []) if emu.find_kernel_output(r) is None
    ]
    return {"invalidDatasetSources": bad_datasets, "invalidKernelSources": bad_kernels}


def _kernel_for_push(emu: KaggleEmulator, owner: str, slug: str, body: dict[str, Any]) -> Kernel:
    kernel = emu.kernels.get((owner, slug))
    if kernel is None or kernel.deleted:
        kernel = Kernel(
            emu.next_id(), owner, slug, body.get("newTitle") or slug, body.get("isPrivate", True)
        )
        emu.kernels[(owner, slug)] = kernel
    elif "isPrivate" in body:
        kernel.is_private = body["isPrivate"]
    if body.get("newTitle"):
        kernel.title = body["newTitle"]
    return kernel


@rpc("kernels.KernelsApiService", "SaveKernel")
def save_kernel(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    owner, slug = _push_target(emu, user, body)
    if owner != user:
        raise ApiError(403, f"User {user} may not push to {owner}/{slug}")
    for required in ("text", "language", "kernelType"):
        if not body.get(required):
            raise ApiError(400, f"{required} is required")
    gpu = _is_gpu(body)
    refusal = _refusal(emu, user, body, gpu)
    if refusal:
        return {"error": refusal}
    kernel = _kernel_for_push(emu, owner, slug, body)
    invalid = _invalid_sources(emu, body)
    session = emu.start_session(kernel, body, gpu)
    # Kaggle's answer carries the version number and the kernel id, not the session's id.
    answer = {
        "ref": f"/code/{owner}/{slug}",
        "url": f"{emu.url}/code/{owner}/{slug}",
        "versionNumber": session.version,
        "kernelId": kernel.id,
        **invalid,
    }
    if emu.config.expose_session_id:
        answer["kernelSessionId"] = session.id
    return answer


@rpc("kernels.KernelsApiService", "GetKernelSessionStatus")
def get_kernel_session_status(
    emu: KaggleEmulator, user: str, body: dict[str, Any]
) -> dict[str, Any]:
    session = _find_session(emu, user, body)
    response: dict[str, Any] = {}
    if session.status != "QUEUED":
        response["status"] = session.status
    if session.failure_message:
        response["failureMessage"] = session.failure_message
    if emu.config.expose_session_id:
        response["kernelSessionId"] = session.id
    return response


def _page(names: list[str], body: dict[str, Any]) -> tuple[list[str], str]:
    size = int(body.get("pageSize") or 20)
    token = body.get("pageToken") or ""
    start = int(token.removeprefix("page-")) if token.startswith("page-") else 0
    rest = start + size
    return names[start:rest], (f"page-{rest}" if rest < len(names) else "")


@rpc("kernels.KernelsApiService", "ListKernelSessionOutput")
def list_kernel_session_output(
    emu: KaggleEmulator, user: str, body: dict[str, Any]
) -> dict[str, Any]:
    session = _find_session(emu, user, body)
    names, next_token = _page(sorted(session.outputs), body)
    files = [{"url": f"{emu.url}/emu/files/{session.id}/{quote(n)}", "fileName": n} for n in names]
    hide = session.live and not emu.config.log_in_output_list_while_running
    response = {"files": files, "log": json.dumps([] if hide else session.log)}
    if next_token:
        response["nextPageToken"] = next_token
    return response


@dataclass(frozen=True)
class LogStream:
    """The answer to GetKernelSessionLogsStream: the server streams ``session``'s log as
    Server-Sent Events while it runs, or sends the saved log (a JSON array) once it ended."""

    session: Session


@rpc("kernels.KernelsApiService", "GetKernelSessionLogsStream")
def get_kernel_session_logs_stream(
    emu: KaggleEmulator, user: str, body: dict[str, Any]
) -> LogStream:
    session_id = int(body.get("kernelSessionId") or 0)
    if not session_id:
        return LogStream(_find_session(emu, user, body))
    session = emu.sessions.get(session_id)
    if session is None or session.owner != user:
        raise ApiError(404, f"Kernel session {session_id} not found")
    return LogStream(session)


@rpc("kernels.KernelsApiService", "CancelKernelSession")
def cancel_kernel_session(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    session = emu.sessions.get(int(body.get("kernelSessionId") or 0))
    if session is None or session.owner != user:
        raise ApiError(404, f"Kernel session {body.get('kernelSessionId')} not found")
    if not session.live:
        return {"errorMessage": f"Kernel session {session.id} is not running ({session.status})"}
    session.status = "CANCEL_REQUESTED"
    session.cancel.set()
    return {}


def _quota(used: float, total: float) -> dict[str, Any]:
    return {
        "timeUsed": duration(used),
        "timeReserved": "0s",
        "totalTimeAllowed": duration(total),
        "minimumTimeAllowed": duration(total),
        "hasEverRun": used > 0,
    }


@rpc("kernels.KernelsApiService", "GetAcceleratorQuotaStatistics")
def get_accelerator_quota_statistics(
    emu: KaggleEmulator, user: str, body: dict[str, Any]
) -> dict[str, Any]:
    cfg = emu.config
    return {
        "quotaRefreshTime": iso(cfg.quota_refresh_time),
        "gpuQuota": _quota(round(emu.gpu_seconds_used(user), 3), emu.gpu_quota_seconds(user)),
        "tpuQuota": _quota(0, cfg.tpu_quota_seconds),
    }


@rpc("kernels.KernelsApiService", "GetKernel")
def get_kernel(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    session = _find_session(emu, user, body)
    kernel = emu.kernels[(session.owner, session.slug)]
    req = session.request
    metadata = {
        "id": kernel.id,
        "ref": f"{kernel.owner}/{kernel.slug}",
        "title": kernel.title,
        "author": kernel.owner,
        "slug": kernel.slug,
        "language": req.get("language"),
        "kernelType": req.get("kernelType"),
        "isPrivate": kernel.is_private,
        "enableGpu": session.gpu,
        "enableTpu": bool(req.get("enableTpu")),
        "enableInternet": bool(req.get("enableInternet")),
        "datasetDataSources": req.get("datasetDataSources", []),
        "kernelDataSources": req.get("kernelDataSources", []),
        "currentVersionNumber": kernel.latest.version if kernel.latest else 0,
        "machineShape": req.get("machineShape"),
    }
    blob = {
        "source": req.get("text"),
        "language": req.get("language"),
        "kernelType": req.get("kernelType"),
        "slug": kernel.slug,
    }
    return {"metadata": {k: v for k, v in metadata.items() if v is not None}, "blob": blob}


@rpc("kernels.KernelsApiService", "DeleteKernel")
def delete_kernel(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    kernel = _find_kernel(emu, user, body.get("userName") or user, body.get("kernelSlug", ""))
    if kernel.owner != user:
        raise ApiError(403, "Permission 'kernels.delete' was denied")
    kernel.deleted = True  # kept (with its sessions) for tests to inspect; gone for the API
    for session in kernel.sessions:
        session.cancel.set()
    return {}


# ---------------------------------------------------------------- blobs and datasets


@rpc("blobs.BlobApiService", "StartBlobUpload")
def start_blob_upload(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    token = f"blob-{emu.next_id()}"
    emu.blobs[token] = Blob(token, body.get("name", ""), int(body.get("contentLength") or 0))
    return {"token": token, "createUrl": f"{emu.url}/emu/upload/{token}"}


def _dataset_files(emu: KaggleEmulator, files: list[dict[str, Any]]) -> dict[str, bytes]:
    out = {}
    for item in files:
        blob = emu.blobs.get(item.get("token", ""))
        if blob is None or not blob.complete:
            raise ApiError(400, f"Upload token {item.get('token')!r} is unknown or incomplete")
        out[blob.name] = blob.data
    return out


def _add_version(
    emu: KaggleEmulator, dataset: Dataset, files: dict[str, bytes], notes: str
) -> dict[str, Any]:
    number = len(dataset.versions) + 1
    dataset.versions.append(
        DatasetVersion(number, files, notes, emu.config.dataset_polls_until_ready)
    )
    return {"ref": dataset.ref, "url": f"{emu.url}/datasets/{dataset.ref}", "status": "ok"}


@rpc("datasets.DatasetApiService", "CreateDataset")
def create_dataset(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    owner, slug = body.get("ownerSlug") or user, body.get("slug", "")
    if owner != user:
        raise ApiError(403, f"User {user} may not create datasets for {owner}")
    if (owner, slug) in emu.datasets:
        return {"status": "error", "error": f"The dataset {owner}/{slug} already exists"}
    files = _dataset_files(emu, body.get("files", []))
    if body.get("isPrivate", True) and _over_private_quota(emu, user, files):
        quota = emu.config.private_dataset_quota_bytes
        return {"status": "error", "error": f"Private dataset quota of {quota:g} bytes exceeded"}
    dataset = Dataset(
        owner,
        slug,
        body.get("title", slug),
        body.get("isPrivate", True),
        body.get("licenseName", ""),
    )
    emu.datasets[(owner, slug)] = dataset
    return _add_version(emu, dataset, files, "")


def _over_private_quota(emu: KaggleEmulator, user: str, files: dict[str, bytes]) -> bool:
    used = sum(d.size for d in emu.datasets.values() if d.owner == user and d.is_private)
    return used + sum(len(data) for data in files.values()) > emu.config.private_dataset_quota_bytes


@rpc("datasets.DatasetApiService", "DeleteDataset")
def delete_dataset(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    owner, slug = body.get("ownerSlug") or user, body.get("datasetSlug", "")
    dataset = _find_dataset(emu, user, owner, slug)
    if owner != user:
        raise ApiError(403, f"User {user} may not delete {owner}/{slug}")
    del emu.datasets[(dataset.owner, dataset.slug)]  # really gone: its bytes leave the quota
    return {}


def _find_dataset(emu: KaggleEmulator, user: str, owner: str, slug: str) -> Dataset:
    dataset = emu.datasets.get((owner, slug))
    if dataset is None or (dataset.is_private and owner != user):
        raise ApiError(404, f"Dataset {owner}/{slug} not found")
    return dataset


@rpc("datasets.DatasetApiService", "CreateDatasetVersion")
def create_dataset_version(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    dataset = _find_dataset(emu, user, body.get("ownerSlug") or user, body.get("datasetSlug", ""))
    inner = body.get("body", {})
    files = _dataset_files(emu, inner.get("files", []))
    if inner.get("deleteOldVersions"):
        dataset.versions = [DatasetVersion(v.number, {}, v.notes) for v in dataset.versions]
    return _add_version(emu, dataset, files, inner.get("versionNotes", ""))


@rpc("datasets.DatasetApiService", "GetDatasetStatus")
def get_dataset_status(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    dataset = _find_dataset(emu, user, body.get("ownerSlug") or user, body.get("datasetSlug", ""))
    latest = dataset.versions[-1]
    if not latest.ready:
        latest.polls_left -= 1
        return {"status": NOT_READY_STATUS}
    return {"status": "READY"}


@rpc("datasets.DatasetApiService", "GetDataset")
def get_dataset(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    dataset = _find_dataset(emu, user, body.get("ownerSlug") or user, body.get("datasetSlug", ""))
    latest = dataset.latest_ready()
    return {"ref": dataset.ref, "ownerRef": dataset.owner, "title": dataset.title,
            "isPrivate": dataset.is_private, "totalBytes": dataset.size,
            "currentVersionNumber": latest.number if latest else None}


@rpc("datasets.DatasetApiService", "DownloadDataset")
def download_dataset(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> Redirect:
    dataset = _find_dataset(emu, user, body.get("ownerSlug") or user, body.get("datasetSlug", ""))
    version = dataset.get_version(body.get("datasetVersionNumber"))
    if version is None:
        raise ApiError(404, f"No ready version of {dataset.ref}")
    path = f"/emu/datasets/{dataset.owner}/{dataset.slug}/{version.number}"
    name = body.get("fileName")
    return Redirect(f"{emu.url}{path}/{quote(name)}" if name else f"{emu.url}{path}.zip")


# ---------------------------------------------------------------- security


@rpc("security.OAuthService", "IntrospectToken")
def introspect_token(emu: KaggleEmulator, user: str, body: dict[str, Any]) -> dict[str, Any]:
    username = emu.tokens.get(body.get("token", ""))
    if username is None:
        return {}  # active=false is the default, so it is omitted
    return {
        "active": True,
        "clientId": "kaggle-cli",
        "username": username,
        "scope": "resources.admin:*",
    }
