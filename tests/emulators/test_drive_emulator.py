"""The unmodified PyDrive2 / googleapiclient / oauth2client stack against the Drive emulator."""

from __future__ import annotations

import hashlib
import io
import json
import os
import webbrowser

import pytest
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaInMemoryUpload, MediaIoBaseUpload
from oauth2client.client import HttpAccessTokenRefreshError
from pydrive2.auth import RefreshError
from pydrive2.drive import GoogleDrive
from pydrive2.files import ApiRequestError

from .drive import (
    COLAB_MIME,
    FOLDER_MIME,
    GOOGLE_TOKEN_URI,
    DriveEmulator,
    LoopbackGoogleAuth,
    LoopbackRefused,
    drive_emulator_fixture,  # noqa: F401 - provides the drive_emulator fixture
    emulator_settings,
    faults,
    loopback_http,
    write_credentials_file,
)

CHUNK = 256 * 1024


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    """Any attempt at an interactive OAuth flow fails the test instead of opening a browser."""
    monkeypatch.setenv("GDRIVE_NON_INTERACTIVE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a browser was opened")

    monkeypatch.setattr(webbrowser, "open", refuse)


def make_auth(drive, tmp_path, **credentials) -> LoopbackGoogleAuth:
    path = write_credentials_file(tmp_path / "credentials.json", drive, **credentials)
    return LoopbackGoogleAuth(drive, settings=emulator_settings(drive, path))


@pytest.fixture
def auth(drive_emulator, tmp_path):
    return make_auth(drive_emulator, tmp_path)


@pytest.fixture
def gdrive(auth):
    return GoogleDrive(auth)


@pytest.fixture
def service(auth):
    """The raw googleapiclient Drive v2 service that PyDrive2 builds."""
    auth.LocalWebserverAuth()  # non-interactive: loads the saved credentials and refreshes them
    auth.Authorize()
    return auth.service


def make_folder(gdrive, title, parent="root"):
    folder = gdrive.CreateFile({"title": title, "mimeType": FOLDER_MIME,
                                "parents": [{"id": parent}]})
    folder.Upload()
    return folder


def upload_bytes(gdrive, title, data, parent="root", mime=None):
    item = gdrive.CreateFile({"title": title, "parents": [{"id": parent}],
                              **({"mimeType": mime} if mime else {})})
    item.content = io.BytesIO(data)
    item.Upload()
    return item


def titles(items):
    return sorted(item["title"] for item in items)


# ---- auth ------------------------------------------------------------------------------

def test_saved_credentials_are_refreshed_without_a_browser(drive_emulator, auth, gdrive,
                                                           tmp_path):
    assert gdrive.ListFile({"q": "trashed = false"}).GetList() == []
    assert len(drive_emulator.calls("oauth.token")) == 1
    saved = json.loads((tmp_path / "credentials.json").read_text())
    assert saved["access_token"] in drive_emulator.state.access_tokens


def test_google_token_uri_is_rewritten_to_the_emulator(drive_emulator, tmp_path):
    gdrive = GoogleDrive(make_auth(drive_emulator, tmp_path, token_uri=GOOGLE_TOKEN_URI))
    assert gdrive.ListFile({"q": "trashed = false"}).GetList() == []
    assert len(drive_emulator.calls("oauth.token")) == 1


def test_revoked_refresh_token_raises_pydrive_refresh_error(drive_emulator, gdrive):
    drive_emulator.revoke_refresh_token()
    with pytest.raises(RefreshError, match="invalid_grant: Token has been expired or revoked"):
        gdrive.ListFile({"q": "trashed = false"}).GetList()


def test_revocation_found_mid_session_surfaces_from_oauth2client(drive_emulator, gdrive):
    gdrive.ListFile({"q": "trashed = false"}).GetList()
    drive_emulator.revoke_refresh_token()
    drive_emulator.expire_access_tokens()
    with pytest.raises(HttpAccessTokenRefreshError, match="invalid_grant"):
        gdrive.ListFile({"q": "trashed = false"}).GetList()


def test_expired_access_token_is_refreshed_transparently(drive_emulator, gdrive):
    gdrive.ListFile({"q": "trashed = false"}).GetList()
    drive_emulator.expire_access_tokens()
    assert gdrive.ListFile({"q": "trashed = false"}).GetList() == []
    assert [r.status for r in drive_emulator.calls("files.list")] == [200, 401, 200]
    assert len(drive_emulator.calls("oauth.token")) == 2


def test_loopback_http_refuses_other_hosts(drive_emulator):
    with pytest.raises(LoopbackRefused):
        loopback_http(drive_emulator).request("https://example.com/")


# ---- files -----------------------------------------------------------------------------

def test_folder_upload_list_download(drive_emulator, gdrive):
    folder = make_folder(gdrive, "gpupool")
    item = upload_bytes(gdrive, "manifest.json", b'{"step": 3}', parent=folder["id"])
    assert item["fileSize"] == "11"
    assert item["md5Checksum"] == hashlib.md5(b'{"step": 3}').hexdigest()
    assert item["parents"][0]["id"] == folder["id"]

    by_parent = gdrive.ListFile({"q": f"'{folder['id']}' in parents and trashed=false"})
    assert titles(by_parent.GetList()) == ["manifest.json"]
    by_title = gdrive.ListFile({"q": "title = 'manifest.json' and trashed = false"})
    assert [f["id"] for f in by_title.GetList()] == [item["id"]]
    assert gdrive.CreateFile({"id": item["id"]}).GetContentString() == '{"step": 3}'

    stored = drive_emulator.state.get(item["id"])
    assert (stored.title, stored.content, stored.parents) == (
        "manifest.json", b'{"step": 3}', [folder["id"]])
    assert drive_emulator.state.get(folder["id"]).mimeType == FOLDER_MIME


def test_same_title_files_coexist(drive_emulator, gdrive):
    first = upload_bytes(gdrive, "ckpt.pt", b"one")
    second = upload_bytes(gdrive, "ckpt.pt", b"two")
    assert first["id"] != second["id"]
    listed = gdrive.ListFile({"q": "'root' in parents and title = 'ckpt.pt'"}).GetList()
    assert sorted(f["id"] for f in listed) == sorted([first["id"], second["id"]])
    assert len(drive_emulator.state.find(title="ckpt.pt")) == 2


def test_trash_and_delete(drive_emulator, gdrive):
    keep, doomed = upload_bytes(gdrive, "keep", b"k"), upload_bytes(gdrive, "doomed", b"d")
    doomed.Trash()
    assert titles(gdrive.ListFile({"q": "trashed = false"}).GetList()) == ["keep"]
    assert titles(gdrive.ListFile({"q": "trashed = true"}).GetList()) == ["doomed"]
    assert titles(gdrive.ListFile({"q": ""}).GetList()) == ["doomed", "keep"]  # v2 lists trash
    doomed.Delete()
    with pytest.raises(ApiRequestError) as raised:
        gdrive.CreateFile({"id": doomed["id"]}).FetchMetadata()
    assert raised.value.error["code"] == 404
    assert drive_emulator.state.get(keep["id"]) is not None


def test_colab_notebook_gets_a_colab_link(drive_emulator, gdrive):
    notebook = upload_bytes(gdrive, "attempt-1.ipynb", b"{}", mime=COLAB_MIME)
    assert notebook["alternateLink"] == f"https://colab.research.google.com/drive/{notebook['id']}"
    assert drive_emulator.state.get(notebook["id"]).mime_type == COLAB_MIME


def test_query_language_subset(gdrive, service):
    make_folder(gdrive, "dir")
    upload_bytes(gdrive, "it's.txt", b"x", mime="text/plain")
    upload_bytes(gdrive, "Other.bin", b"y")
    query = ("(title = 'it\\'s.txt' or title = 'other.bin') and not "
             f"mimeType = '{FOLDER_MIME}' and trashed = false")
    assert titles(gdrive.ListFile({"q": query}).GetList()) == ["Other.bin", "it's.txt"]
    assert titles(gdrive.ListFile({"q": "mimeType = 'text/plain'"}).GetList()) == ["it's.txt"]
    with pytest.raises(HttpError) as raised:
        service.files().list(q="sharedWithMe").execute()
    assert raised.value.resp.status == 400


def test_long_query_sent_as_post_override(drive_emulator, gdrive):
    folders = [make_folder(gdrive, f"d{n}")["id"] for n in range(3)]
    upload_bytes(gdrive, "inner", b"", parent=folders[2])
    ids = [drive_emulator.state.new_file_id() for _ in range(60)] + folders
    query = " or ".join(f"'{i}' in parents" for i in ids)  # > 2 kB: googleapiclient POSTs it
    assert titles(gdrive.ListFile({"q": f"({query}) and trashed=false"}).GetList()) == ["inner"]
    assert drive_emulator.calls("files.list")[-1].headers["x-http-method-override"] == "GET"


def test_paging_with_max_results(gdrive):
    for n in range(5):
        upload_bytes(gdrive, f"f{n}", b"")
    pages = [len(page) for page in gdrive.ListFile({"q": "trashed=false", "maxResults": 2})]
    assert pages == [2, 2, 1]


def test_fields_give_partial_responses(gdrive, service):
    item = upload_bytes(gdrive, "a.bin", b"abc")
    assert service.files().get(fileId=item["id"], fields="fileSize").execute() == {
        "fileSize": "3"}
    listed = service.files().list(q="trashed=false", fields="items(id,labels/trashed)").execute()
    assert listed == {"items": [{"id": item["id"], "labels": {"trashed": False}}]}


def test_about_reports_user_and_quota(drive_emulator, gdrive, service):
    upload_bytes(gdrive, "a.bin", b"abcd")
    about = service.about().get().execute()
    assert about["user"]["emailAddress"] == drive_emulator.state.user_email
    assert about["quotaBytesUsed"] == "4" and about["rootFolderId"] == drive_emulator.state.root_id


def test_storage_quota_exceeded(tmp_path):
    with DriveEmulator(quota_bytes=10) as drive:
        gdrive = GoogleDrive(make_auth(drive, tmp_path))
        with pytest.raises(ApiRequestError) as raised:
            upload_bytes(gdrive, "big.bin", b"x" * 11)
    assert raised.value.GetField("reason") == "storageQuotaExceeded"


def test_trash_counts_against_the_quota_until_deleted_or_emptied(tmp_path):
    with DriveEmulator(quota_bytes=10) as drive:
        gdrive = GoogleDrive(make_auth(drive, tmp_path))
        first = upload_bytes(gdrive, "a.bin", b"x" * 6)
        first.Trash()
        with pytest.raises(ApiRequestError) as raised:  # trashed bytes still count
            upload_bytes(gdrive, "b.bin", b"y" * 6)
        assert raised.value.GetField("reason") == "storageQuotaExceeded"
        about = gdrive.GetAbout()
        assert about["quotaBytesUsedInTrash"] == "6"
        gdrive.auth.service.files().emptyTrash().execute()
        assert drive.state.bytes_used() == 0 and drive.state.get(first["id"]) is None
        second = upload_bytes(gdrive, "b.bin", b"y" * 6)
        second.Delete()
        assert drive.state.bytes_used() == 0


def test_updating_a_file_is_charged_only_for_its_growth(tmp_path):
    with DriveEmulator(quota_bytes=10) as drive:
        gdrive = GoogleDrive(make_auth(drive, tmp_path))
        item = upload_bytes(gdrive, "status.json", b"x" * 8)
        item.content = io.BytesIO(b"y" * 9)  # 9 bytes in 10: fine though 8 + 9 > 10
        item.Upload()
        assert drive.state.get(item["id"]).content == b"y" * 9


@pytest.mark.parametrize("fault", [faults.lost_answer(500), faults.lost_answer()],
                         ids=["500", "reset"])
def test_lost_answer_applies_the_insert_but_the_client_sees_a_failure(drive_emulator, service,
                                                                      fault):
    drive_emulator.inject("files.insert", fault)
    with pytest.raises((HttpError, OSError)):
        service.files().insert(body={"title": "once", "mimeType": FOLDER_MIME}).execute()
    assert [f.title for f in drive_emulator.state.find("once")] == ["once"]
    assert drive_emulator.calls("files.insert")[0].status == (500 if fault.status else None)


def test_stall_until_holds_a_request_until_released(drive_emulator, tmp_path):
    import threading

    release = threading.Event()
    drive_emulator.inject("files.list", faults.stall_until(release))
    quick = loopback_http(drive_emulator, timeout=0.5)
    with pytest.raises(OSError):  # a client with a timeout gives up...
        quick.request("https://www.googleapis.com/drive/v2/files", "GET")
    assert drive_emulator.held == 1  # ...while the request is still held
    release.set()


# ---- uploads and downloads -------------------------------------------------------------

def chunked_insert(service, data, title="big.bin"):
    media = MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream", chunksize=CHUNK,
                              resumable=True)
    return service.files().insert(body={"title": title}, media_body=media)


def test_resumable_upload_in_chunks(drive_emulator, service):
    data = os.urandom(4 * CHUNK + 123)
    result = chunked_insert(service, data).execute()
    assert drive_emulator.state.get(result["id"]).content == data
    assert [r.status for r in drive_emulator.calls("upload.chunk")] == [308] * 4 + [200]
    assert result["md5Checksum"] == hashlib.md5(data).hexdigest()


def test_interrupted_resumable_upload_resumes_where_it_stopped(drive_emulator, service):
    data = os.urandom(3 * CHUNK)
    drive_emulator.inject("upload.chunk", faults.cut_upload(after_bytes=100_000))
    request = chunked_insert(service, data)
    with pytest.raises(OSError):
        request.next_chunk()
    response = None
    while response is None:
        _, response = request.next_chunk()
    assert drive_emulator.state.get(response["id"]).content == data
    status_query = drive_emulator.calls("upload.chunk")[1]
    assert status_query.headers["content-range"] == f"bytes */{len(data)}"
    assert status_query.status == 308


def test_multipart_and_simple_media_uploads(drive_emulator, service):
    body = {"title": "meta.txt", "mimeType": "text/plain"}
    multipart = service.files().insert(
        body=body, media_body=MediaInMemoryUpload(b"multi\r\npart", "text/plain")).execute()
    simple = service.files().insert(
        media_body=MediaInMemoryUpload(b"raw", "application/x-raw")).execute()
    assert drive_emulator.state.get(multipart["id"]).content == b"multi\r\npart"
    assert (simple["title"], simple["mimeType"]) == ("Untitled", "application/x-raw")


def test_update_replaces_content_by_id(drive_emulator, gdrive):
    item = upload_bytes(gdrive, "manifest.json", b"v1")
    same = gdrive.CreateFile({"id": item["id"]})
    same.SetContentString("v2")
    same.Upload()  # files.update with media
    same["title"] = "renamed.json"
    same.Upload()  # files.patch
    stored = drive_emulator.state.get(item["id"])
    assert (stored.content, stored.title, len(drive_emulator.state.listing())) == (
        b"v2", "renamed.json", 1)


def test_ranged_download_in_chunks(drive_emulator, gdrive, tmp_path):
    data = os.urandom(2 * CHUNK + 7)
    item = upload_bytes(gdrive, "big.bin", data)
    gdrive.CreateFile({"id": item["id"]}).GetContentFile(str(tmp_path / "out"), chunksize=CHUNK)
    assert (tmp_path / "out").read_bytes() == data
    assert [r.status for r in drive_emulator.calls("files.download")] == [206, 206, 206]


# ---- faults ----------------------------------------------------------------------------

@pytest.mark.parametrize("fault, status, reason", [
    (faults.rate_limit(), 403, "userRateLimitExceeded"),
    (faults.too_many_requests(), 429, "rateLimitExceeded"),
    (faults.server_error(), 500, "backendError"),
    (faults.service_unavailable(), 503, "backendError"),
])
def test_http_faults_are_http_errors(drive_emulator, gdrive, fault, status, reason):
    drive_emulator.inject("files.list", fault)
    with pytest.raises(ApiRequestError) as raised:
        gdrive.ListFile({"q": "trashed = false"}).GetList()
    assert isinstance(raised.value.args[0], HttpError)
    assert raised.value.args[0].resp.status == status
    assert raised.value.GetField("reason") == reason
    assert gdrive.ListFile({"q": "trashed = false"}).GetList() == []  # the fault is spent


def test_injected_401_triggers_a_refresh(drive_emulator, gdrive):
    drive_emulator.inject("files.list", faults.token_expired())
    assert gdrive.ListFile({"q": "trashed = false"}).GetList() == []
    assert len(drive_emulator.calls("oauth.token")) == 2


def test_connection_reset_is_an_os_error(drive_emulator, gdrive):
    item = upload_bytes(gdrive, "a", b"a")
    drive_emulator.inject("files.get", faults.connection_reset())
    with pytest.raises(OSError):
        gdrive.CreateFile({"id": item["id"]}).FetchMetadata()
    assert drive_emulator.faults.pending() == 0


# ---- fsspec ----------------------------------------------------------------------------

def test_gdrive_filesystem_on_the_emulator(drive_emulator, gdrive, auth, tmp_path):
    from pydrive2.fs import GDriveFileSystem

    make_folder(gdrive, "gpupool")
    fs = GDriveFileSystem("root/gpupool", google_auth=auth, skip_instance_cache=True)
    local = tmp_path / "step-1.pt"
    local.write_bytes(b"weights")
    fs.put_file(str(local), "root/gpupool/ckpt/step-1.pt")  # creates ckpt/ on the way
    assert fs.ls("root/gpupool/ckpt") == ["root/gpupool/ckpt/step-1.pt"]
    assert fs.info("root/gpupool/ckpt/step-1.pt")["checksum"] == hashlib.md5(b"weights").hexdigest()
    assert fs.cat_file("root/gpupool/ckpt/step-1.pt") == b"weights"

    drive_emulator.inject("files.list", faults.rate_limit())  # fs retries 403 rate limits
    fs.put_file(str(local), "root/gpupool/ckpt/step-1.pt")
    assert fs.find("root/gpupool") == ["root/gpupool/ckpt/step-1.pt"] * 2  # Drive duplicates

    fs.rm_file("root/gpupool/ckpt/step-1.pt")  # trashes one of the two
    assert len(fs.ls("root/gpupool/ckpt")) == 1
    assert sum(drive_emulator.state.is_trashed(f) for f in drive_emulator.state.listing()) == 1
