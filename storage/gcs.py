"""Google Cloud Storage backend on `gcloud-aio-storage`, sharing one aiohttp session.

- Credentials: the service-account JSON of GCS_CREDENTIALS (handed over as `io.StringIO`), or a key file.
- The API root is passed explicitly (real GCS, or STORAGE_EMULATOR_HOST), so the process environment at import
  time cannot silently redirect traffic.
- Signed URLs are V4, signed locally with the key by `Blob.get_signed_url`. That function builds the URL on
  `gcloud.aio.storage.blob.HOST`, read from STORAGE_EMULATOR_HOST when the library was imported; against an
  emulator it yields `https://http://host/...`, so we rebuild the URL on the emulator's base. The emulator does
  not verify signatures, so the URL is fetchable there as long as fake-gcs-server runs with
  `-public-host <host:port of STORAGE_EMULATOR_HOST>`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from gcloud.aio.storage import Storage as GcloudStorage
from gcloud.aio.storage import blob as gcloud_blob

from ._http import attempt_timeout, network_error, status_error, stream_to_file
from .backend import ObjectInfo, Storage
from .config import StorageConfig
from .errors import StorageError, StorageNotConfiguredError, StorageRequestError
from .retry import Transient, status_reason
from .urls import RefLocation

GCS_API_ROOT = "https://www.googleapis.com"
GCS_SIGNING_HOST = "storage.googleapis.com"


class GcsStorage(Storage):
    def __init__(self, config: StorageConfig, session: aiohttp.ClientSession | None = None) -> None:
        super().__init__(config, session)
        self._emulator = config.emulator_host
        if self._emulator is None and gcloud_blob.HOST != GCS_SIGNING_HOST:
            raise StorageNotConfiguredError(
                "STORAGE_EMULATOR_HOST was set in the process environment when gcloud-aio-storage was imported,"
                " but this configuration targets real GCS: signed URLs would name the wrong host")
        if config.credentials_json is not None:
            service_file: Any = io.StringIO(config.credentials_json)
        elif config.credentials_file is not None:
            service_file = config.credentials_file
        else:
            service_file = io.StringIO("{}")  # emulator without a key: never look for ambient credentials
        self._client = GcloudStorage(
            service_file=service_file, session=self.session,
            api_root=self._emulator or GCS_API_ROOT, api_is_dev=self._emulator is not None)
        self._api_host = urlsplit(self._emulator or GCS_API_ROOT).hostname
        self._can_sign = config.has_private_key

    def _trusted_hosts(self) -> frozenset[str]:
        host = urlsplit(self._emulator).hostname if self.config.emulator_host else None
        return frozenset({host.lower()}) if host else frozenset()

    # -- references ----------------------------------------------------------------------------------------
    async def _download_object(self, location: RefLocation, dest: Path, max_bytes: int,
                               on_size: Callable[[int | None], None] | None = None) -> int:
        what = location.display

        async def once() -> int:
            try:
                stream = await self._client.download_stream(
                    location.bucket, location.object_name, timeout=attempt_timeout(self.config.timeout_s))
                async with stream as resp:  # the aiohttp response; released on exit
                    return await stream_to_file(resp, dest, max_bytes, what, on_size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._map(exc, what, reading=True) from None

        return await self._with_retries(once, f"download of {what}")

    # -- results -------------------------------------------------------------------------------------------
    async def upload(self, data: bytes, object_name: str, content_type: str) -> None:
        name = self._check_object_name(object_name)
        what = f"gs://{self.bucket}/{name}"

        async def once() -> None:
            try:
                # Simple (one-request) upload: each retry resends the whole body, and nothing half-written
                # becomes visible in GCS.
                await self._client.upload(
                    self.bucket, name, bytes(data), content_type=content_type, force_resumable_upload=False,
                    timeout=attempt_timeout(self.config.timeout_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._map(exc, what, reading=False) from None

        await self._with_retries(once, f"upload of {what}")

    async def signed_url(self, object_name: str, ttl_s: int | None = None) -> str:
        name = self._check_object_name(object_name)
        ttl = self._check_ttl(ttl_s)
        if self._emulator is not None and not self._can_sign:
            return f"{self._emulator}/{self.bucket}/{quote(name, safe='/~')}"
        blob = self._client.get_bucket(self.bucket).new_blob(name)
        try:
            url = await blob.get_signed_url(ttl)
        except ValueError:
            raise StorageNotConfiguredError("the service-account private_key cannot sign URLs") from None
        if self._emulator is None:
            return url
        prefix = f"https://{gcloud_blob.HOST}"
        if not url.startswith(prefix):
            raise StorageError("unexpected signed URL shape from gcloud-aio-storage")
        return self._emulator + url[len(prefix):]

    async def metadata(self, object_name: str) -> ObjectInfo:
        name = self._check_object_name(object_name)
        what = f"gs://{self.bucket}/{name}"

        async def once() -> dict:
            try:
                return await self._client.download_metadata(
                    self.bucket, name, timeout=attempt_timeout(self.config.timeout_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._map(exc, what, reading=True) from None

        data = await self._with_retries(once, f"metadata of {what}")
        return ObjectInfo(self.bucket, name, int(data.get("size", 0)), str(data.get("contentType") or ""))

    async def check(self) -> None:
        what = f"bucket {self.bucket!r} (GCS_BUCKET_NAME)"

        async def once() -> None:
            try:
                await self._client.list_objects(
                    self.bucket, params={"maxResults": "1"}, timeout=attempt_timeout(self.config.timeout_s))
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientResponseError as exc:
                if exc.status == 404 and self._is_api_error(exc):
                    raise StorageNotConfiguredError(f"{what} does not exist") from None
                if exc.status in (401, 403) and self._is_api_error(exc):
                    raise StorageNotConfiguredError(
                        f"{self.config.credentials_description} may not list objects in {what}"
                        f" (HTTP {exc.status})") from None
                raise self._map(exc, what, reading=False) from None
            except Exception as exc:  # noqa: BLE001
                raise self._map(exc, what, reading=False) from None

        if self._emulator is None:
            await self._check_token()
        try:
            await self._with_retries(once, f"access check of {what}")
        except StorageRequestError as exc:
            raise StorageNotConfiguredError(f"{what} is not usable: {exc}") from None

    async def _check_token(self) -> None:
        """Obtain one access token directly (the library's own acquire retries for a minute on a bad key)."""
        token = self._client.token

        async def once() -> None:
            try:
                await token.refresh(timeout=self.config.timeout_s)
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientResponseError as exc:
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    raise StorageNotConfiguredError(
                        f"could not obtain an access token (HTTP {exc.status}) with"
                        f" {self.config.credentials_description}") from None
                raise Transient(f"access token request: HTTP {exc.status}", reason=status_reason(exc.status)) from None
            except (KeyError, ValueError, TypeError) as exc:
                raise StorageNotConfiguredError(
                    f"could not obtain an access token with {self.config.credentials_description}"
                    f" ({type(exc).__name__})") from None
            except Exception as exc:  # noqa: BLE001
                raise network_error(exc, "the token endpoint") from None

        await self._with_retries(once, "access token request")

    async def close(self) -> None:
        if not self._closed:
            await self._client.close()  # leaves a shared session open
        await super().close()

    # -- errors --------------------------------------------------------------------------------------------
    def _is_api_error(self, exc: aiohttp.ClientResponseError) -> bool:
        """False when the failed request went to the token endpoint rather than the storage API."""
        host = exc.request_info.real_url.host if exc.request_info is not None else None
        return host is None or host == self._api_host

    def _map(self, exc: BaseException, what: str, *, reading: bool) -> BaseException:
        if isinstance(exc, aiohttp.ClientResponseError):
            if not self._is_api_error(exc):
                host = exc.request_info.real_url.host
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    return StorageNotConfiguredError(
                        f"could not obtain an access token from {host} (HTTP {exc.status}) with"
                        f" {self.config.credentials_description}")
                return Transient(f"access token request: HTTP {exc.status}", reason=status_reason(exc.status))
            if reading or exc.status != 404:
                return status_error(exc.status, what, reading=reading, headers=exc.headers)
            return StorageRequestError(f"GCS refused the request for {what} (HTTP 404: does the bucket exist?)")
        return network_error(exc, what)
