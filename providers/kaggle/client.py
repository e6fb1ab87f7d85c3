"""A thin wrapper over ``kagglesdk.KaggleClient`` that adds what the client lacks.

The SDK sets no HTTP timeout (a stalled connection blocks forever) and retries nothing for
push, status or output. Every call here has a per-request timeout and a bounded number of
retries with exponential backoff and jitter on connection errors, timeouts, 5xx and 429
(honouring ``Retry-After``). ``sleep`` is injected so tests never really wait.

A call that is not idempotent (a push, a dataset create) is retried only when it surely did
not happen (429, no connection made). Any other failure (a 5xx, a timeout or reset after the
request was sent) raises ``OutcomeUnknown``: the caller asks Kaggle what exists before it
sends anything again, since a second push would start a second session.

kagglesdk is imported only when the first client is built (``import kagglesdk`` itself has no
side effects, unlike ``import kaggle``, which authenticates at import time).
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gpupool.errors import CredentialsError, ProviderError, RateLimited, RemoteNotFound

from .config import KaggleConfig
from .credentials import Credentials

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CHUNK = 1 << 20


class OutcomeUnknown(ProviderError):
    """A call that is not idempotent got no clear answer (5xx, timeout, reset after sending):
    it may or may not have taken effect. Resolve it by asking what exists; never resend."""


@dataclass(frozen=True)
class KernelStatus:
    name: str | None  # a KernelWorkerStatus name; None when the client cannot parse it
    failure: str  # Kaggle's failureMessage, as it was
    session_id: int | None  # ``kernelSessionId`` when the answer carries one (see cancel)


@dataclass(frozen=True)
class OutputFile:
    name: str
    url: str


@dataclass(frozen=True)
class RemoteQuota:
    used_seconds: float
    total_seconds: float
    refresh_time: float | None


class KaggleRemote:
    """Kaggle's API as gpupool uses it; each method is one (retried) remote call."""

    def __init__(self, credentials: Credentials, config: KaggleConfig,
                 sleep: Callable[[float], None] = time.sleep):
        self.credentials = credentials
        self.config = config
        self.sleep = sleep
        self._sdk: Any = None
        self._downloads: Any = None
        self._answers = threading.local()  # the last raw HTTP answer, per thread

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            self._sdk = self._build()
        return self._sdk

    def _build(self) -> Any:
        try:
            from kagglesdk import KaggleClient
        except ImportError as err:
            raise ProviderError("kaggle", f"kagglesdk is not installed ({err}); "
                                          "pip install 'kaggle==2.2.4' 'kagglesdk==0.1.37'") from None
        creds = self.credentials
        client = KaggleClient(username=creds.username, password=creds.key, api_token=creds.token,
                              user_agent="gpupool")
        http = client.http_client()
        http._init_session()  # the SDK builds its requests.Session lazily; harden it now
        _harden(http._session, creds, self._timeout_now, self._keep_answer)
        return client

    def _keep_answer(self, response: Any) -> None:
        self._answers.last = response

    def _answer_field(self, name: str) -> Any:
        """A field of the last JSON answer that kagglesdk's typed objects drop (unknown to it)."""
        response = getattr(self._answers, "last", None)
        try:
            body = response.json() if response is not None else None
        except ValueError:
            return None
        return body.get(name) if isinstance(body, dict) else None

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) seconds of one request."""
        return self._timeout

    @property
    def _timeout(self) -> tuple[float, float]:
        return (min(10.0, self.config.request_timeout), self.config.request_timeout)

    def _timeout_now(self) -> tuple[float, float]:
        """(connect, read) seconds for this thread's request: a stream sets its own read gap."""
        return getattr(self._answers, "timeout", None) or self._timeout

    def call(self, what: str, func: Callable[[], T], *, idempotent: bool = True) -> T:
        """``func()`` with retries; ``idempotent=False`` retries only what surely was not done."""
        attempt = 0
        while True:
            try:
                return func()
            except Exception as err:  # noqa: BLE001 - requests/SDK errors are classified below
                delay = self._retry_delay(what, err, attempt, idempotent)
                log.info("kaggle: %s failed (%s); retry %d in %.1fs", what, _brief(err),
                         attempt + 1, delay)
            attempt += 1
            self.sleep(delay)

    def _retry_delay(self, what: str, err: Exception, attempt: int, idempotent: bool) -> float:
        """How long to wait before retrying ``err``, or raise the error gpupool should see."""
        import requests

        status = _status_of(err)
        if status is None and not isinstance(err, requests.RequestException):
            raise err
        if not idempotent and not _surely_not_done(err, status):
            raise OutcomeUnknown("kaggle", f"{what}: no clear answer ({_brief(err)}); "
                                           "it may have taken effect")
        retry_after = _retry_after(err) if status == 429 else None
        retryable = status in RETRY_STATUSES or status is None
        if not retryable or attempt >= self.config.max_retries:
            raise _translate(what, err, status, retry_after)
        if retry_after is not None:
            if retry_after > self.config.backoff_max:
                raise RateLimited("kaggle", f"{what}: rate limited", retry_after)
            return retry_after
        base = min(self.config.backoff_max, self.config.backoff_base * 2 ** attempt)
        return base * (0.5 + random.random() / 2)

    # -- kernels ----------------------------------------------------------------------------

    def introspect_username(self) -> str:
        from kagglesdk.security.types.oauth_service import IntrospectTokenRequest

        request = IntrospectTokenRequest()
        request.token = self.credentials.token
        answer = self.call("token check", lambda: self.sdk.security.oauth_client.introspect_token(request))
        if not answer.active or not answer.username:
            raise CredentialsError("kaggle", f"the access token from {self.credentials.source} "
                                             "is not active; create a new one on kaggle.com")
        return str(answer.username)

    def push(self, request: Any) -> tuple[Any, int | None]:
        """Push and run the kernel: (``ApiSaveKernelResponse``, session id if the answer has one).
        Raises ``OutcomeUnknown`` when the push may have landed without a clear answer."""
        kernels = self.sdk.kernels.kernels_api_client
        answer = self.call("push", lambda: kernels.save_kernel(request), idempotent=False)
        return answer, _int_or_none(self._answer_field("kernelSessionId"))

    def status(self, owner: str, slug: str, version: int | None) -> KernelStatus:
        """The session's status; raises ``RemoteNotFound`` when there is no such kernel."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusRequest

        request = ApiGetKernelSessionStatusRequest()
        request.user_name, request.kernel_slug = owner, slug
        if version:
            request.version_label = f"v{version}"
        kernels = self.sdk.kernels.kernels_api_client
        try:
            answer = self.call("status", lambda: kernels.get_kernel_session_status(request))
        except KeyError as err:  # kagglesdk raises KeyError for a status it does not know
            return KernelStatus(None, f"unknown status {err}", None)
        return KernelStatus(answer.status.name, answer.failure_message or "",
                            _int_or_none(self._answer_field("kernelSessionId")))

    def current_version(self, owner: str, slug: str) -> int | None:
        """The kernel's newest version number, None when there is no such kernel."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

        request = ApiGetKernelRequest()
        request.user_name, request.kernel_slug = owner, slug
        answer = self._unless_gone("get kernel",
                                   lambda: self.sdk.kernels.kernels_api_client.get_kernel(request))
        if answer is None:
            return None
        return int(answer.metadata.current_version_number or 0) or None

    def outputs(self, owner: str, slug: str, version: int | None) -> tuple[list[OutputFile], str]:
        """Every output file of the session (all pages) and its log (JSON array text)."""
        from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

        files: list[OutputFile] = []
        log_text, token = "", ""
        seen_tokens: set[str] = set()
        kernels = self.sdk.kernels.kernels_api_client
        while True:
            request = ApiListKernelSessionOutputRequest()
            request.user_name, request.kernel_slug = owner, slug
            request.page_size, request.page_token = 100, token
            if version:
                request.version_label = f"v{version}"
            page = self.call("list outputs", partial(kernels.list_kernel_session_output, request))
            files += [OutputFile(f.file_name, f.url) for f in page.files]
            log_text = log_text or page.log or ""
            token = page.next_page_token or ""
            if not token:
                return files, log_text
            if token in seen_tokens:  # a server paging in circles must not hold us forever
                raise ProviderError("kaggle", f"listing outputs of {owner}/{slug}: page token "
                                              f"{token!r} repeats")
            seen_tokens.add(token)

    def open_log_stream(self, owner: str, slug: str, version: int | None, session_id: int | None,
                        idle_seconds: float) -> Any:
        """GetKernelSessionLogsStream, once (no retry): the streamed ``requests.Response`` that
        the caller reads and closes. While the session runs Kaggle answers Server-Sent Events
        (``text/event-stream``) until ``END_OF_LOG``; after it, the saved log as a JSON array
        (kagglesdk's docstring). A read waits at most ``idle_seconds`` for the next bytes.
        Raises ``requests.RequestException`` (an HTTP error, a timeout)."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionLogsStreamRequest

        request = ApiGetKernelSessionLogsStreamRequest()
        request.user_name, request.kernel_slug = owner, slug
        if version:
            request.version_label = f"v{version}"
        if session_id:
            request.kernel_session_id = session_id
        self._answers.timeout = (self._timeout[0], idle_seconds)
        try:
            return self.sdk.kernels.kernels_api_client.get_kernel_session_logs_stream(request)
        finally:
            self._answers.timeout = None

    def cancel(self, session_id: int) -> str:
        """Ask Kaggle to stop a session (asking twice is harmless); returns its error text."""
        from kagglesdk.kernels.types.kernels_api_service import ApiCancelKernelSessionRequest

        request = ApiCancelKernelSessionRequest()
        request.kernel_session_id = session_id
        kernels = self.sdk.kernels.kernels_api_client
        answer = self.call("cancel", lambda: kernels.cancel_kernel_session(request))
        return answer.error_message or ""

    def delete_kernel(self, owner: str, slug: str) -> bool:
        """Delete the kernel (its versions, outputs and logs); False when it was already gone."""
        from kagglesdk.kernels.types.kernels_api_service import ApiDeleteKernelRequest

        request = ApiDeleteKernelRequest()
        request.user_name, request.kernel_slug = owner, slug
        return self._delete("kernel", f"{owner}/{slug}", lambda answer: answer.error_message,
                            lambda: self.sdk.kernels.kernels_api_client.delete_kernel(request))

    def delete_dataset(self, owner: str, slug: str) -> bool:
        """Delete the dataset (every version); False when it was already gone."""
        from kagglesdk.datasets.types.dataset_api_service import ApiDeleteDatasetRequest

        request = ApiDeleteDatasetRequest()
        request.owner_slug, request.dataset_slug = owner, slug
        return self._delete("dataset", f"{owner}/{slug}", lambda answer: answer.error,
                            lambda: self.sdk.datasets.dataset_api_client.delete_dataset(request))

    def _unless_gone(self, what: str, send: Callable[[], T]) -> T | None:
        """``send()`` through ``call`` (its retries and errors); None when Kaggle answers that
        there is no such kernel or dataset (``RemoteNotFound``)."""
        try:
            return self.call(what, send)
        except RemoteNotFound:
            return None

    def _delete(self, kind: str, name: str, refusal: Callable[[Any], str | None],
                send: Callable[[], Any]) -> bool:
        """Send one delete call; False when Kaggle has no such ``kind`` (already gone), and a
        ``ProviderError`` when it refused (``refusal(answer)``: the answer's error text)."""
        answer = self._unless_gone(f"delete {kind}", send)
        if answer is None:
            return False
        if refusal(answer):
            raise ProviderError("kaggle", f"deleting {kind} {name} failed: {refusal(answer)}")
        return True

    def quota(self) -> RemoteQuota:
        from kagglesdk.kernels.types.kernels_api_service import (
            ApiGetAcceleratorQuotaStatisticsRequest,
        )

        kernels = self.sdk.kernels.kernels_api_client
        request = ApiGetAcceleratorQuotaStatisticsRequest()
        answer = self.call("quota", lambda: kernels.get_accelerator_quota_statistics(request))
        gpu = answer.gpu_quota
        if gpu is None or gpu.total_time_allowed is None:
            raise ProviderError("kaggle", "the quota answer has no GPU quota")
        refresh = answer.quota_refresh_time
        return RemoteQuota(_seconds(gpu.time_used), _seconds(gpu.total_time_allowed),
                           refresh.timestamp() if refresh is not None else None)

    # -- datasets ---------------------------------------------------------------------------

    def dataset_status(self, owner: str, slug: str) -> str | None:
        """The dataset's status name (READY...), None when there is no such dataset."""
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetStatusRequest

        request = ApiGetDatasetStatusRequest()
        request.owner_slug, request.dataset_slug = owner, slug
        datasets = self.sdk.datasets.dataset_api_client
        answer = self._unless_gone("dataset status", lambda: datasets.get_dataset_status(request))
        return answer.status.name if answer is not None else None

    def upload(self, path: Path, sha256: str | None = None) -> str:
        """Upload one file as a dataset blob (resumed after a cut, hashed as it is sent,
        with progress); returns its token. See ``uploads.upload_blob``."""
        from .uploads import upload_blob

        return upload_blob(self, path, sha256)

    def create_dataset(self, owner: str, slug: str, tokens: list[str], *, private: bool) -> None:
        from kagglesdk.datasets.types.dataset_api_service import (
            ApiCreateDatasetRequest,
            ApiDatasetNewFile,
        )

        request = ApiCreateDatasetRequest()
        request.owner_slug, request.slug, request.title = owner, slug, slug
        request.license_name, request.is_private = "unknown", private
        request.files = [_new_file(ApiDatasetNewFile, token) for token in tokens]
        datasets = self.sdk.datasets.dataset_api_client
        # Not idempotent: an unclear answer raises OutcomeUnknown, and the caller asks.
        answer = self.call("create dataset", lambda: datasets.create_dataset(request),
                           idempotent=False)
        if answer.error and "already" not in answer.error:
            raise ProviderError("kaggle", f"creating dataset {owner}/{slug} failed: {answer.error}")

    def create_dataset_version(self, owner: str, slug: str, tokens: list[str], *,
                               delete_old: bool) -> None:
        """A new version of ``owner/slug`` holding the uploaded files (``delete_old``: drop
        the files of every older version). Not idempotent: an unclear answer raises
        ``OutcomeUnknown`` (compare ``dataset_version`` before and after to resolve it)."""
        from kagglesdk.datasets.types.dataset_api_service import (
            ApiCreateDatasetVersionRequest,
            ApiCreateDatasetVersionRequestBody,
            ApiDatasetNewFile,
        )

        body = ApiCreateDatasetVersionRequestBody()
        body.version_notes = "gpupool: new content"
        body.delete_old_versions = delete_old
        body.files = [_new_file(ApiDatasetNewFile, token) for token in tokens]
        request = ApiCreateDatasetVersionRequest()
        request.owner_slug, request.dataset_slug, request.body = owner, slug, body
        datasets = self.sdk.datasets.dataset_api_client
        answer = self.call("create dataset version",
                           lambda: datasets.create_dataset_version(request), idempotent=False)
        if answer.error:
            raise ProviderError("kaggle", f"a new version of dataset {owner}/{slug} failed: "
                                          f"{answer.error}")

    def dataset_version(self, owner: str, slug: str) -> int | None:
        """The dataset's current version number, None when there is no such dataset (or this
        account cannot read it)."""
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

        request = ApiGetDatasetRequest()
        request.owner_slug, request.dataset_slug = owner, slug
        datasets = self.sdk.datasets.dataset_api_client
        answer = self._unless_gone("dataset version", lambda: datasets.get_dataset(request))
        return _int_or_none(answer.current_version_number) if answer is not None else None

    def open_dataset_zip(self, owner: str, slug: str, version: int) -> Any:
        """The streaming answer (a ``requests.Response``) carrying one version's files as a
        zip; kagglesdk's DownloadDataset answers with a redirect to a signed URL, followed
        here. Raises RemoteNotFound when the dataset or version is gone."""
        from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

        request = ApiDownloadDatasetRequest()
        request.owner_slug, request.dataset_slug = owner, slug
        request.dataset_version_number = version
        datasets = self.sdk.datasets.dataset_api_client
        return self.call(f"download {owner}/{slug}", lambda: datasets.download_dataset(request))

    def open_range(self, url: str, start: int) -> Any:
        """A streaming GET of a signed URL (no auth) from byte ``start`` on (HTTP Range)."""
        timeout = (self._timeout[0], self.config.download_timeout)
        headers = {"Range": f"bytes={start}-"} if start else {}

        def get() -> Any:
            response = self.plain_session().get(url, stream=True, timeout=timeout, headers=headers)
            response.raise_for_status()
            return response

        return self.call("resume download", get)

    # -- output files -----------------------------------------------------------------------

    def download(self, url: str, target: Path) -> None:
        """Fetch a signed output URL (no auth) into ``target``; a broken stream raises."""
        def fetch() -> None:
            timeout = (self._timeout[0], self.config.download_timeout)
            with self.plain_session().get(url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                with open(target, "wb") as handle:
                    for chunk in response.iter_content(CHUNK):
                        handle.write(chunk)

        self.call(f"download {target.name}", fetch)

    def plain_session(self) -> Any:
        """A plain requests session (no auth): signed URLs for blob uploads and downloads."""
        if self._downloads is None:
            import requests

            self._downloads = requests.Session()
        return self._downloads


def _harden(session: Any, creds: Credentials, timeout: Callable[[], tuple[float, float]],
            keep: Callable[[Any], None]) -> None:
    """Give every request of the SDK's session a timeout, and the auth we chose (the SDK would
    otherwise prefer any access token lying around over an explicitly configured key); hand
    each answer to ``keep`` (to read fields the SDK's types drop)."""
    from kagglesdk.kaggle_http_client import KaggleHttpClient

    if creds.token:
        session.auth = KaggleHttpClient.BearerAuth(creds.token)
    else:
        session.auth = (creds.username, creds.key)
    send = session.send

    def send_with_timeout(request: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout()
        response = send(request, **kwargs)
        if not kwargs.get("stream"):
            keep(response)
        return response

    session.send = send_with_timeout


def _new_file(cls: Any, token: str) -> Any:
    item = cls()
    item.token = token
    return item


def _status_of(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _surely_not_done(err: Exception, status: int | None) -> bool:
    """Whether a failed call certainly had no effect: a definite answer (4xx, including a 429
    refusal), or a connection that was never made. A 5xx, a read timeout or a reset after
    sending leave the outcome unknown."""
    import requests

    if status is not None:
        return status < 500
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(err, requests.exceptions.ConnectionError) and err.args:
        from urllib3.exceptions import NewConnectionError

        reason = getattr(err.args[0], "reason", None)
        return isinstance(reason, NewConnectionError)  # refused: nothing was sent
    return False


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and int(value) > 0 else None
    except (TypeError, ValueError):
        return None


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def _translate(what: str, err: Exception, status: int | None, retry_after: float | None) -> ProviderError:
    if status == 429:
        return RateLimited("kaggle", f"{what}: rate limited by Kaggle", retry_after)
    if status == 401:
        return CredentialsError("kaggle", f"{what}: Kaggle refused the credentials (401); "
                                          "check or renew your API key")
    if status in (403, 404):
        return RemoteNotFound("kaggle", f"{what}: not found ({status})")
    return ProviderError("kaggle", f"{what} failed: {_brief(err)}")


def detail(err: Exception) -> str:
    """The error's text without the provider's own "kaggle: " prefix, for messages that
    already say which provider they are about."""
    return str(err).removeprefix("kaggle: ")


def _brief(err: Exception) -> str:
    """The error without URLs' query strings (signed URLs) or anything long."""
    text = f"{type(err).__name__}: {err}"
    return text.split("?", 1)[0][:300]


def _seconds(value: Any) -> float:
    if value is None:
        return 0.0
    return float(value.total_seconds()) if hasattr(value, "total_seconds") else float(value)
