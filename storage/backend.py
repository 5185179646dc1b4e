"""The storage interface both backends (`gcs.py`, `local.py`) implement. `storage.factory.open_storage(config)`
picks one: this module imports neither backend, so no module imports one that imports it back.

    Storage.parse_ref_url(url)                 validate a caller's reference URL (no I/O)
    Storage.download(url, dest_path, max_bytes) stream a reference to a file: gs:// via the backend, https via HTTP
    Storage.check_access(url)                  prove the caller's https URL still grants read access (1-byte GET)
    Storage.upload(data, object_name, content_type)
    Storage.signed_url(object_name, ttl_s)     a URL the caller can fetch: V4-signed (GCS) or file:// (local)
    Storage.metadata(object_name)              size and content type of an object in the configured bucket
    Storage.check()                            prove at start that the bucket is usable
    Storage.close()

Every network operation runs under `call_with_retries` (backoff with jitter on connection errors, 408, 429, 5xx;
never on other 4xx). https references are fetched with the shared aiohttp session, without following redirects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

from ._http import attempt_timeout, make_session, network_error, status_error, stream_to_file
from .config import MAX_SIGNED_URL_TTL_S, StorageConfig
from .errors import StorageInputError
from .retry import RetryObserver, RetryPolicy, call_with_retries
from .urls import RefLocation, parse_ref_url, validate_object_name

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    name: str
    size: int
    content_type: str


class Storage(ABC):
    """One bucket (`config.bucket`) for writes; references from any allowed bucket or host."""

    def __init__(self, config: StorageConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self.policy = config.url_policy
        self.retry_policy = RetryPolicy(
            max_retries=config.max_retries, base_s=config.retry_base_s,
            max_backoff_s=config.retry_max_backoff_s, deadline_s=config.retry_deadline_s)
        self.observer: RetryObserver | None = None  # the worker's metrics: retries and final errors, by reason
        self._session = session
        self._owns_session = session is None
        self._closed = False

    # -- validation (no I/O) -------------------------------------------------------------------------------
    def parse_ref_url(self, url: str) -> RefLocation:
        return parse_ref_url(url, self.policy)

    # -- operations ----------------------------------------------------------------------------------------
    async def download(self, url: str | RefLocation, dest_path: str | os.PathLike[str],
                       max_bytes: int | None = None, *, on_size: Callable[[int | None], None] | None = None,
                       ) -> int:
        """Stream the reference at `url` into `dest_path` (created or truncated); return its size in bytes.
        The caller owns `dest_path` (the cache passes a temp file and renames it when this returns).

        `on_size(n)` is called on the event loop once the source has answered and before any byte is written,
        with the size it declares (Content-Length, file size) or None when it declares none; again on a retry.
        The cache reserves room with it; the byte cap is enforced on the bytes actually read either way."""
        location = url if isinstance(url, RefLocation) else self.parse_ref_url(url)
        limit = self.config.max_ref_bytes if max_bytes is None else max_bytes
        dest = Path(dest_path)
        if location.scheme == "gs":
            return await self._download_object(location, dest, limit, on_size)
        return await self._with_retries(
            lambda: self._download_url_once(location, dest, limit, on_size), f"download of {location.display}")

    async def check_access(self, url: str | RefLocation) -> None:
        """Prove that the caller's reference URL grants read access now, without downloading it.

        `gs://` references need no proof: they are read with the service's own credentials and governed by
        ALLOWED_BUCKETS (checked when the URL was parsed). An https reference gets ONE ranged GET of its first
        byte (`Range: bytes=0-0`) under the same rules as a download: allowed hosts and buckets (parsed), the
        connect-time address guard, no redirects, the per-attempt timeout and the retry policy. GET rather than
        HEAD because a V4 signature covers the HTTP method: a URL signed for GET is refused for HEAD. A refusal
        raises what a download of that URL would (403 -> RefAudioForbiddenError, 404 -> RefAudioNotFoundError,
        redirect -> StorageRequestError, spent retries -> StorageUnavailableError)."""
        location = url if isinstance(url, RefLocation) else self.parse_ref_url(url)
        if location.scheme == "gs":
            return
        await self._with_retries(lambda: self._probe_url_once(location), f"access check of {location.display}")

    async def _with_retries(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """`operation` under this store's retry policy, reported to `observer`."""
        return await call_with_retries(operation, self.retry_policy, what, observer=self.observer)

    @abstractmethod
    async def _download_object(self, location: RefLocation, dest: Path, max_bytes: int,
                               on_size: Callable[[int | None], None] | None = None) -> int:
        """Fetch `gs://bucket/object` through this backend (with retries where the backend is remote)."""

    @abstractmethod
    async def upload(self, data: bytes, object_name: str, content_type: str) -> None:
        """Write `data` to `object_name` in the configured bucket (replacing it)."""

    @abstractmethod
    async def signed_url(self, object_name: str, ttl_s: int | None = None) -> str:
        """A URL for `object_name` valid `ttl_s` seconds (default `SIGNED_URL_TTL_S`)."""

    @abstractmethod
    async def metadata(self, object_name: str) -> ObjectInfo:
        """Size and content type of `object_name` in the configured bucket."""

    @abstractmethod
    async def check(self) -> None:
        """Raise `StorageNotConfiguredError` (or `StorageUnavailableError`) if the bucket cannot be used."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- helpers for subclasses ---------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = make_session(self.policy, self._trusted_hosts())
        return self._session

    def _trusted_hosts(self) -> frozenset[str]:
        return frozenset()

    def _check_ttl(self, ttl_s: int | None) -> int:
        ttl = self.config.signed_url_ttl_s if ttl_s is None else ttl_s
        if not isinstance(ttl, int) or not 1 <= ttl <= MAX_SIGNED_URL_TTL_S:
            raise StorageInputError(f"ttl_s must be an integer in 1..{MAX_SIGNED_URL_TTL_S}, got {ttl!r}")
        return ttl

    @staticmethod
    def _check_object_name(object_name: str) -> str:
        return validate_object_name(object_name)

    async def _download_url_once(self, location: RefLocation, dest: Path, max_bytes: int,
                                 on_size: Callable[[int | None], None] | None = None) -> int:
        """One GET of an https (or, in tests, loopback http) reference URL, redirects not followed."""
        assert location.fetch_url is not None
        what = location.display
        with _mapped_errors(what):
            async with self.session.get(
                location.fetch_url, allow_redirects=False, timeout=attempt_timeout(self.config.timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise status_error(resp.status, what, reading=True, headers=resp.headers)
                return await stream_to_file(resp, dest, max_bytes, what, on_size)

    async def _probe_url_once(self, location: RefLocation) -> None:
        """One `Range: bytes=0-0` GET of the caller's URL; 200 or 206 grants access. The body is not read
        (a server that ignores Range has its connection closed rather than drained)."""
        assert location.fetch_url is not None
        what = location.display
        with _mapped_errors(what):
            async with self.session.get(
                location.fetch_url, allow_redirects=False, timeout=attempt_timeout(self.config.timeout_s),
                headers={"Range": "bytes=0-0"},
            ) as resp:
                if resp.status not in (200, 206):
                    raise status_error(resp.status, what, reading=True, headers=resp.headers)
                if resp.status == 200:
                    resp.close()


@contextlib.contextmanager
def _mapped_errors(what: str) -> Iterator[None]:
    """Errors of one HTTP attempt as this package's errors (`network_error`): never re-raised with the signed URL
    inside. Cancellation passes through."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        mapped = network_error(exc, what)
        if mapped is exc:
            raise
        raise mapped from None
