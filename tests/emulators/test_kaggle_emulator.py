"""The unmodified kagglesdk / kaggle clients against the loopback Kaggle emulator."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from kagglesdk.blobs.types.blob_api_service import ApiBlobType, ApiStartBlobUploadRequest
from kagglesdk.datasets.types.dataset_api_service import (
    ApiCreateDatasetRequest,
    ApiDatasetNewFile,
    ApiDeleteDatasetRequest,
    ApiDownloadDatasetRequest,
    ApiGetDatasetRequest,
    ApiGetDatasetStatusRequest,
)
from kagglesdk.kernels.types.kernels_api_service import (
    ApiCancelKernelSessionRequest,
    ApiDeleteKernelRequest,
    ApiGetAcceleratorQuotaStatisticsRequest,
    ApiGetKernelRequest,
    ApiGetKernelSessionStatusRequest,
    ApiListKernelSessionOutputRequest,
    ApiSaveKernelRequest,
)
from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus
from kagglesdk.security.types.oauth_service import IntrospectTokenRequest

from .kaggle import Fault, KaggleEmulator

SLEEP_FOREVER = "import time\nopen('started.txt', 'w').write('yes')\ntime.sleep(60)\n"


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[KaggleEmulator]:
    with KaggleEmulator(workdir=tmp_path / "kaggle-emulator") as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _isolated_kaggle_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kagglesdk prefers an access token from the env or ~/.kaggle over username/key: hide any."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)


def push(client, slug: str, code: str, *, gpu: bool = False, **fields):
    request = ApiSaveKernelRequest()
    request.slug, request.new_title, request.text = slug, slug.split("/")[1].title(), code
    request.language, request.kernel_type, request.enable_gpu = "python", "script", gpu
    for name, value in fields.items():
        setattr(request, name, value)
    return client.kernels.kernels_api_client.save_kernel(request)


def status_of(client, slug: str):
    request = ApiGetKernelSessionStatusRequest()
    request.user_name, request.kernel_slug = slug.split("/")
    return client.kernels.kernels_api_client.get_kernel_session_status(request)


def outputs_of(client, slug: str, page_token: str = ""):
    request = ApiListKernelSessionOutputRequest()
    request.user_name, request.kernel_slug = slug.split("/")
    request.page_token = page_token
    return client.kernels.kernels_api_client.list_kernel_session_output(request)


# ---------------------------------------------------------------- running kernels


def test_pushed_script_runs_and_its_working_file_comes_back(
    emu: KaggleEmulator,
) -> None:
    emu.add_dataset("alice/ckpts", {"step.txt": b"41"})
    client = emu.sdk_client()
    code = textwrap.dedent("""
        import os, pathlib
        root = pathlib.Path(os.environ["KAGGLE_ROOT"])
        step = int((root / "input/datasets/alice/ckpts/step.txt").read_text()) + 1
        pathlib.Path("model.txt").write_text(str(step))
        env = os.environ
        print("run type", env["KAGGLE_KERNEL_RUN_TYPE"], "key leaked", "KAGGLE_KEY" in env)
    """)
    response = push(client, "alice/train-job", code, dataset_data_sources=["alice/ckpts"])
    assert not response.error and response.version_number == 1

    assert emu.wait("alice/train-job").status == "COMPLETE"
    assert status_of(client, "alice/train-job").status == KernelWorkerStatus.COMPLETE
    listing = outputs_of(client, "alice/train-job")
    assert [f.file_name for f in listing.files] == ["model.txt"]
    assert requests.get(listing.files[0].url, timeout=5).text == "42"
    log = json.loads(listing.log)
    assert (
        log[0]["stream_name"] == "stdout" and log[0]["data"] == "run type Batch key leaked False\n"
    )
    assert emu.kernel("alice/train-job").is_private


def test_kernel_source_mounts_previous_output_and_legacy_layout(
    emu: KaggleEmulator,
) -> None:
    emu.config.input_layout = "both"
    emu.add_dataset("alice/ckpts", {"a.txt": b"A"})
    client = emu.sdk_client()
    push(client, "alice/first-job", "open('ckpt.bin', 'wb').write(b'CK')")
    emu.wait("alice/first-job")
    code = textwrap.dedent("""
        import os, pathlib
        root = pathlib.Path(os.environ["KAGGLE_ROOT"])
        paths = ["notebooks/alice/first-job/ckpt.bin", "first-job/ckpt.bin", "ckpts/a.txt"]
        found = [(root / "input" / path).read_bytes() for path in paths]
        assert found == [b"CK", b"CK", b"A"], found
    """)
    push(
        client,
        "alice/second-job",
        code,
        kernel_data_sources=["alice/first-job"],
        dataset_data_sources=["alice/ckpts"],
    )
    assert emu.wait("alice/second-job").status == "COMPLETE", emu.session("alice/second-job").log


def test_failing_script_is_error_with_message_and_versions_are_kept(
    emu: KaggleEmulator,
) -> None:
    client = emu.sdk_client()
    push(client, "alice/bad-job", "raise SystemExit(3)")
    emu.wait("alice/bad-job")
    status = status_of(client, "alice/bad-job")
    assert status.status == KernelWorkerStatus.ERROR and "code 3" in status.failure_message

    assert push(client, "alice/bad-job", "print('fixed')").version_number == 2
    emu.wait("alice/bad-job/2")
    first = ApiGetKernelSessionStatusRequest()
    first.user_name, first.kernel_slug, first.version_label = "alice", "bad-job", "v1"
    get_status = client.kernels.kernels_api_client.get_kernel_session_status
    assert get_status(first).status == KernelWorkerStatus.ERROR
    assert status_of(client, "alice/bad-job").status == KernelWorkerStatus.COMPLETE


def test_cap_kills_session_with_error_and_keeps_output(emu: KaggleEmulator) -> None:
    emu.config.session_cap_seconds = 0.5
    client = emu.sdk_client()
    push(client, "alice/long-job", SLEEP_FOREVER, gpu=True)
    session = emu.wait("alice/long-job", timeout=10)
    assert session.status == "ERROR" and session.exit_code == -9
    assert "maximum run time of 0.5 seconds" in status_of(client, "alice/long-job").failure_message
    assert list(session.outputs) == ["started.txt"]
    assert 0.4 < emu.gpu_seconds_used() < 5


def test_session_timeout_seconds_is_enforced(emu: KaggleEmulator) -> None:
    emu.config.limit_keeps_output = False
    push(emu.sdk_client(), "alice/short-job", SLEEP_FOREVER, session_timeout_seconds=1)
    session = emu.wait("alice/short-job")
    assert session.status == "ERROR" and session.outputs == {}


def test_gpu_session_is_stopped_when_quota_runs_out(emu: KaggleEmulator) -> None:
    emu.config.gpu_quota_seconds = 0.5
    push(emu.sdk_client(), "alice/quota-job", SLEEP_FOREVER, gpu=True)
    session = emu.wait("alice/quota-job")
    assert session.status == "ERROR" and "quota" in session.failure_message


def test_gpu_concurrency_cap_refuses_push_then_cancel_frees_a_slot(
    emu: KaggleEmulator,
) -> None:
    client = emu.sdk_client()
    first = push(client, "alice/gpu-one", SLEEP_FOREVER, gpu=True)
    push(client, "alice/gpu-two", SLEEP_FOREVER, machine_shape="NvidiaTeslaT4")
    refused = push(client, "alice/gpu-three", SLEEP_FOREVER, gpu=True)
    assert refused.error == "Maximum batch GPU session count of 2 reached"
    assert not push(client, "alice/cpu-job", "print(1)").error  # CPU sessions are not capped

    assert "scriptVersionId" not in first.url  # Kaggle's answer names no session
    session_id = emu.session("alice/gpu-one").id
    emu.wait_status(session_id, "RUNNING")
    cancel = ApiCancelKernelSessionRequest()
    cancel.kernel_session_id = session_id
    client.kernels.kernels_api_client.cancel_kernel_session(cancel)
    assert emu.wait(session_id).status == "CANCEL_ACKNOWLEDGED"
    assert not push(client, "alice/gpu-three", SLEEP_FOREVER, gpu=True).error


def test_quota_statistics_and_refusal_when_exhausted(emu: KaggleEmulator) -> None:
    emu.config.gpu_quota_seconds = 30 * 3600
    emu.gpu_seconds_finished = 3600
    client = emu.sdk_client()
    quota = client.kernels.kernels_api_client.get_accelerator_quota_statistics(
        ApiGetAcceleratorQuotaStatisticsRequest()
    )
    assert quota.gpu_quota.time_used == dt.timedelta(hours=1)
    assert quota.gpu_quota.total_time_allowed == dt.timedelta(hours=30)
    assert quota.quota_refresh_time > dt.datetime.now()
    raw = next(r for r in emu.requests if r.endpoint == "GetAcceleratorQuotaStatistics")
    assert raw.headers["Authorization"].startswith("Basic ")

    emu.gpu_seconds_finished = 30 * 3600
    assert "GPU quota exceeded" in push(client, "alice/gpu-job", "print(1)", gpu=True).error
    assert not push(client, "alice/cpu-job", "print(1)").error


def test_output_listing_is_paged(emu: KaggleEmulator) -> None:
    client = emu.sdk_client()
    push(client, "alice/many-files", "for i in range(25): open(f'f{i:02}.txt', 'w').write(str(i))")
    emu.wait("alice/many-files")
    first = outputs_of(client, "alice/many-files")
    second = outputs_of(client, "alice/many-files", first.next_page_token)
    assert len(first.files) == 20 and len(second.files) == 5 and not second.next_page_token


def test_get_kernel_returns_metadata_and_source(emu: KaggleEmulator) -> None:
    client = emu.sdk_client()
    push(client, "alice/meta-job", "print(2)", gpu=True, is_private=True)
    request = ApiGetKernelRequest()
    request.user_name, request.kernel_slug = "alice", "meta-job"
    kernel = client.kernels.kernels_api_client.get_kernel(request)
    assert (
        kernel.metadata.is_private
        and kernel.metadata.enable_gpu
        and kernel.blob.source == "print(2)"
    )


def test_stop_kills_running_kernels(tmp_path: Path) -> None:
    with KaggleEmulator(workdir=tmp_path / "emu") as emu:
        push(emu.sdk_client(), "alice/orphan-job", SLEEP_FOREVER)
        session = emu.wait_status("alice/orphan-job", "RUNNING")
    assert session.process is not None and session.process.poll() == -9
    assert session.status == "ERROR"


@pytest.mark.parametrize("via", ["endpoint", "proxy"])
def test_connect_aims_clients_built_later(
    emu: KaggleEmulator, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    from kagglesdk import KaggleClient

    emu.connect(monkeypatch, via=via)
    client = KaggleClient(username="alice", password="alice-key")  # env LOCALHOST, read here
    assert not push(client, "alice/connect-job", "print(1)").error
    target = emu.requests[-1].target
    expected = "http://localhost/api/v1/" if via == "proxy" else "/api/v1/"
    assert target.startswith(expected)


# ---------------------------------------------------------------- auth


def test_wrong_key_is_401_and_bearer_token_works(emu: KaggleEmulator) -> None:
    with pytest.raises(requests.HTTPError) as caught:
        status_of(emu.sdk_client(key="wrong"), "alice/none")
    assert caught.value.response.status_code == 401

    emu.tokens["tok-123"] = "alice"
    client = emu.sdk_client(token="tok-123")
    assert not push(client, "alice/token-job", "print(1)").error
    assert emu.requests[-1].headers["Authorization"] == "Bearer tok-123"
    request = IntrospectTokenRequest()
    request.token = "tok-123"
    assert client.security.oauth_client.introspect_token(request).username == "alice"


def test_unknown_kernel_is_403(emu: KaggleEmulator) -> None:
    with pytest.raises(requests.HTTPError) as caught:
        status_of(emu.sdk_client(), "alice/never-pushed")
    assert caught.value.response.status_code == 403


# ---------------------------------------------------------------- faults


def test_faults_as_the_sdk_sees_them(emu: KaggleEmulator) -> None:
    client = emu.sdk_client()
    push(client, "alice/fault-job", "open('o.bin', 'wb').write(b'x' * 1000)")
    emu.wait("alice/fault-job")
    emu.inject(
        "GetKernelSessionStatus",
        Fault.rate_limit(7),
        Fault.http(503),
        Fault.reset(),
        Fault.extra_fields(brandNewField=1),
        Fault.status("PAUSED_BY_NEW_FEATURE"),
    )
    with pytest.raises(requests.HTTPError) as caught:
        status_of(client, "alice/fault-job")
    assert (
        caught.value.response.status_code == 429
        and caught.value.response.headers["Retry-After"] == "7"
    )
    with pytest.raises(requests.HTTPError, match="503"):
        status_of(client, "alice/fault-job")
    with pytest.raises(requests.ConnectionError):
        status_of(client, "alice/fault-job")
    assert (
        status_of(client, "alice/fault-job").status == KernelWorkerStatus.COMPLETE
    )  # extra field ignored
    with pytest.raises(KeyError):  # kagglesdk cannot parse an unknown status string
        status_of(client, "alice/fault-job")

    url = outputs_of(client, "alice/fault-job").files[0].url
    emu.inject("download", Fault.truncate())
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = requests.get(url, timeout=5).content
    assert len(requests.get(url, timeout=5).content) == 1000


def test_hang_outlasts_a_client_timeout(emu: KaggleEmulator) -> None:
    emu.inject("GetKernelSessionStatus", Fault.hang(2))
    with pytest.raises(requests.Timeout):
        requests.post(
            f"{emu.url}/api/v1/kernels.KernelsApiService/GetKernelSessionStatus",
            json={},
            auth=("alice", "alice-key"),
            timeout=0.3,
        )


RPC = "/api/v1/kernels.KernelsApiService/"


def raw_push(emu: KaggleEmulator, slug: str, timeout: float = 5.0) -> requests.Response:
    body = {"slug": slug, "newTitle": slug, "text": SLEEP_FOREVER, "language": "python",
            "kernelType": "script", "enableGpu": True}
    return requests.post(emu.url + RPC + "SaveKernel", json=body, auth=("alice", "alice-key"),
                         timeout=timeout)


def test_push_answered_500_after_it_took_effect(emu: KaggleEmulator) -> None:
    emu.inject("SaveKernel", Fault.http(500, after=True))
    with pytest.raises(requests.HTTPError, match="500"):
        push(emu.sdk_client(), "alice/landed-job", SLEEP_FOREVER, gpu=True)
    assert [k.slug for k in emu.live_kernels()] == ["landed-job"]
    assert emu.wait_status("alice/landed-job", "RUNNING").version == 1
    assert len(emu.sessions) == 1


def test_late_answer_and_reset_after_effect(emu: KaggleEmulator) -> None:
    emu.inject("SaveKernel", Fault.hang(3, after=True), Fault.reset(after=True))
    with pytest.raises(requests.Timeout):
        raw_push(emu, "alice/late-job", timeout=0.3)
    assert emu.session("alice/late-job").version == 1  # created before the (late) answer
    with pytest.raises(requests.ConnectionError):
        raw_push(emu, "alice/reset-job")
    assert emu.session("alice/reset-job").version == 1
    assert len(emu.sessions) == 2


def test_hang_before_effect_creates_the_kernel_only_later(emu: KaggleEmulator) -> None:
    emu.config.max_hang_seconds = 1.0
    emu.inject("SaveKernel", Fault.hang(1.0))
    with pytest.raises(requests.Timeout):
        raw_push(emu, "alice/slow-job", timeout=0.2)
    assert not emu.kernels  # not yet: the server is still stalling
    emu.wait_status("alice/slow-job", "RUNNING", timeout=10)  # then it lands, unseen


def test_session_id_is_exposed_only_when_configured(emu: KaggleEmulator) -> None:
    answer = raw_push(emu, "alice/id-job").json()
    assert "kernelSessionId" not in answer and "scriptVersionId" not in answer["url"]
    emu.config.expose_session_id = True
    answer = raw_push(emu, "alice/id-job-2").json()
    status = requests.post(emu.url + RPC + "GetKernelSessionStatus", auth=("alice", "alice-key"),
                           json={"userName": "alice", "kernelSlug": "id-job-2"}, timeout=5)
    session = emu.session("alice/id-job-2")
    assert answer["kernelSessionId"] == status.json()["kernelSessionId"] == session.id


def test_cancel_ends_the_session_and_its_charge(emu: KaggleEmulator) -> None:
    client = emu.sdk_client()
    push(client, "alice/charged", SLEEP_FOREVER, gpu=True)
    session = emu.wait_status("alice/charged", "RUNNING")
    cancel = ApiCancelKernelSessionRequest()
    cancel.kernel_session_id = session.id
    assert not client.kernels.kernels_api_client.cancel_kernel_session(cancel).error_message
    assert emu.wait(session.id).status == "CANCEL_ACKNOWLEDGED"
    charged = session.charged_seconds
    assert emu.charged_sessions() == [session] and charged > 0
    assert session.charged_seconds == charged  # no longer growing
    assert emu.gpu_seconds_used() == pytest.approx(charged)


def test_delete_kernel_and_dataset_really_delete_and_free_quota(emu: KaggleEmulator) -> None:
    emu.config.private_dataset_quota_bytes = 8
    client = emu.sdk_client()
    emu.add_dataset("alice/inputs-one", {"a.bin": b"12345"})
    token = _uploaded(client, "b.bin", b"6789")
    refused = client.datasets.dataset_api_client.create_dataset(_create("inputs-two", token))
    assert "quota" in (refused.error or "")
    delete = ApiDeleteDatasetRequest()
    delete.owner_slug, delete.dataset_slug = "alice", "inputs-one"
    client.datasets.dataset_api_client.delete_dataset(delete)
    assert not emu.live_datasets()
    with pytest.raises(requests.HTTPError, match="not found"):
        client.datasets.dataset_api_client.delete_dataset(delete)
    created = client.datasets.dataset_api_client.create_dataset(_create("inputs-two", token))
    assert created.status == "ok" and len(emu.live_datasets()) == 1

    push(client, "alice/gone-job", "print(1)")
    emu.wait("alice/gone-job")
    remove = ApiDeleteKernelRequest()
    remove.user_name, remove.kernel_slug = "alice", "gone-job"
    client.kernels.kernels_api_client.delete_kernel(remove)
    assert not emu.live_kernels()
    with pytest.raises(requests.HTTPError):
        status_of(client, "alice/gone-job")


def _uploaded(client, name: str, data: bytes) -> str:
    start = ApiStartBlobUploadRequest()
    start.type, start.name, start.content_length = ApiBlobType.DATASET, name, len(data)
    blob = client.blobs.blob_api_client.start_blob_upload(start)
    requests.put(blob.create_url, data=data, timeout=5).raise_for_status()
    return str(blob.token)


def _create(slug: str, token: str) -> ApiCreateDatasetRequest:
    create = ApiCreateDatasetRequest()
    create.owner_slug, create.slug, create.title, create.is_private = "alice", slug, slug, True
    new_file = ApiDatasetNewFile()
    new_file.token = token
    create.files = [new_file]
    return create


# ---------------------------------------------------------------- datasets


def test_get_dataset_gives_the_newest_version_number(emu: KaggleEmulator) -> None:
    client = emu.sdk_client()
    emu.add_dataset("alice/inputs-one", {"a.bin": b"1"})
    emu.add_dataset("alice/inputs-one", {"a.bin": b"2"})
    request = ApiGetDatasetRequest()
    request.owner_slug, request.dataset_slug = "alice", "inputs-one"
    answer = client.datasets.dataset_api_client.get_dataset(request)
    assert answer.current_version_number == 2 and answer.is_private
    request.dataset_slug = "no-such-set"
    with pytest.raises(requests.HTTPError, match="not found"):
        client.datasets.dataset_api_client.get_dataset(request)


def test_dataset_upload_create_and_status_via_sdk(emu: KaggleEmulator) -> None:
    emu.config.dataset_polls_until_ready = 2
    client = emu.sdk_client()
    status = ApiGetDatasetStatusRequest()
    status.owner_slug, status.dataset_slug = "alice", "ckpt-store"
    with pytest.raises(requests.HTTPError) as caught:
        client.datasets.dataset_api_client.get_dataset_status(status)
    assert caught.value.response.status_code == 404

    start = ApiStartBlobUploadRequest()
    start.type, start.name, start.content_length = ApiBlobType.DATASET, "last.pt", 5
    blob = client.blobs.blob_api_client.start_blob_upload(start)
    assert requests.put(blob.create_url, data=b"12345", timeout=5).status_code == 200
    create = ApiCreateDatasetRequest()
    create.owner_slug, create.slug, create.title, create.is_private = (
        "alice",
        "ckpt-store",
        "Ckpt store",
        True,
    )
    new_file = ApiDatasetNewFile()
    new_file.token = blob.token
    create.files = [new_file]
    assert client.datasets.dataset_api_client.create_dataset(create).status == "ok"

    states = [
        client.datasets.dataset_api_client.get_dataset_status(status).status.name for _ in range(3)
    ]
    assert states == ["BLOBS_RECEIVED", "BLOBS_RECEIVED", "READY"]
    dataset = emu.datasets[("alice", "ckpt-store")]
    assert dataset.is_private and dataset.versions[0].files == {"last.pt": b"12345"}

    download = ApiDownloadDatasetRequest()
    download.owner_slug, download.dataset_slug = "alice", "ckpt-store"
    response = client.datasets.dataset_api_client.download_dataset(download)  # follows a redirect
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.read("last.pt") == b"12345"


# ---------------------------------------------------------------- KaggleApi through HTTP_PROXY

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import kaggle  # authenticates from KAGGLE_USERNAME/KAGGLE_KEY at import
    api, work, out = kaggle.api, sys.argv[1], {}
    response = api.kernels_push(os.path.join(work, "kernel"))
    out["push_error"], out["version"] = response.error, response.version_number
    deadline = time.monotonic() + 15
    while api.kernels_status("alice/proxy-job").status.name not in ("COMPLETE", "ERROR"):
        assert time.monotonic() < deadline, "kernel did not finish"
        time.sleep(0.05)
    out["status"] = api.kernels_status("alice/proxy-job").status.name
    files, _ = api.kernels_output("alice/proxy-job", os.path.join(work, "out"), force=True)
    out["files"] = sorted(os.path.basename(f) for f in files)
    out["result"] = open(os.path.join(work, "out", "result.txt")).read()
    created = api.dataset_create_new(os.path.join(work, "dataset"), quiet=True)
    out["dataset"] = [created.status, created.error]
    out["dataset_states"] = [api.dataset_status("alice/ckpt-store") for _ in range(2)]
    out["quota_view"] = str(api.quota_view().gpu_quota.total_time_allowed)
    print(json.dumps(out))
""")


def _write_project(work: Path) -> None:
    (work / "kernel").mkdir(parents=True)
    (work / "kernel" / "run.py").write_text(
        "open('result.txt', 'w').write('trained')\nprint('done')\n"
    )
    meta = {
        "id": "alice/proxy-job",
        "title": "Proxy Job",
        "code_file": "run.py",
        "language": "python",
        "kernel_type": "script",
        "enable_gpu": True,
        "enable_internet": False,
    }
    (work / "kernel" / "kernel-metadata.json").write_text(json.dumps(meta))
    (work / "dataset").mkdir()
    (work / "dataset" / "last.pt").write_bytes(b"weights")
    meta = {
        "id": "alice/ckpt-store",
        "title": "Checkpoint store",
        "licenses": [{"name": "CC0-1.0"}],
    }
    (work / "dataset" / "dataset-metadata.json").write_text(json.dumps(meta))


def test_kaggle_api_through_http_proxy_with_retry_on_429(
    emu: KaggleEmulator, tmp_path: Path
) -> None:
    emu.inject("StartBlobUpload", Fault.rate_limit(0.1))
    emu.inject("CreateDataset", Fault.rate_limit(0.1))
    work = tmp_path / "project"
    _write_project(work)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(
        emu.proxy_env(),
        KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle-config"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert out["push_error"] in ("", None) and out["version"] == 1 and out["status"] == "COMPLETE"
    assert out["files"] == ["proxy-job.log", "result.txt"] and out["result"] == "trained"
    assert (
        out["dataset"][0] == "ok"
        and not out["dataset"][1]
        and out["dataset_states"] == ["blobs_received", "ready"]
    )
    assert out["quota_view"] == "1 day, 6:00:00"
    assert (
        emu.kernel("alice/proxy-job").is_private
        and emu.datasets[("alice", "ckpt-store")].is_private
    )
    assert emu.session("alice/proxy-job").request["enableInternet"] is False
    creates = [r for r in emu.requests if r.endpoint == "CreateDataset"]
    starts = [r for r in emu.requests if r.endpoint == "StartBlobUpload"]
    assert len(creates) == 2 and len(starts) == 2  # each 429 was retried after its Retry-After
    assert creates[0].target == "http://localhost/api/v1/datasets.DatasetApiService/CreateDataset"
