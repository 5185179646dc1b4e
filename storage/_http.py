"""HTTP plumbing shared by both backends: the aiohttp session, streaming a response to a file under a byte cap,
and turning aiohttp failures into `Transient` (retry) or a clear `StorageError` (stop).

The session's resolver (`GuardedResolver`) re-checks, at connect time, every hostname a caller's URL may reach
(those matching ALLOWED_REF_HOSTS): if any address it resolves to is not public (loopback is allowed only under
ALLOW_LOOPBACK_REF_URLS), the request is refused. Operator hosts (the GCS API, the token endpoint, the metadata
server, STORAGE_EMULATOR_HOST) are not caller-reachable and pass unchecked. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp
from aiohttp.abc import AbstractResolver

from .errors import (
    InvalidRefUrlError,
    LocalStorageError,
    RefAudioForbiddenError,
    RefAudioNotFoundError,
    RefAudioTooLargeError,
    StorageError,
    StorageRequestError,
)
from .retry import Transient, http_status_transient, status_reason
from .urls import UrlPolicy

CHUNK_BYTES = 256 * 1024


class GuardedResolver(AbstractResolver):
    """Wraps a resolver; refuses caller-reachable hostnames that resolve to non-public addresses."""

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver | None = None,
                 trusted_hosts: frozenset[str] = frozenset()) -> None:
        self._policy = policy
        self._inner = inner or aiohttp.ThreadedResolver()
        self._trusted = trusted_hosts

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await self._inner.resolve(host, port, family)
        name = host.lower().rstrip(".")
        if name in self._trusted or self._policy.match_host(name) is None:
            return results
        bad = [r["host"] for r in results if not self._policy.address_allowed(r["host"])]
        if bad or not results:
            raise InvalidRefUrlError(f"reference host {name!r} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


def make_session(policy: UrlPolicy, trusted_hosts: frozenset[str] = frozenset(),
                 resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """The one session a backend uses for everything. Timeouts are set per request (`attempt_timeout`)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver, trusted_hosts), limit=100, ttl_dns_cache=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


def attempt_timeout(timeout_s: float) -> aiohttp.ClientTimeout:
    """Per attempt: bound the connect and every silence while reading, not the whole body (large files are
    fine as long as bytes keep coming; the retry deadline bounds the whole operation)."""
    return aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)


async def stream_to_file(resp: aiohttp.ClientResponse, dest: Path, max_bytes: int, what: str,
                         on_size: Callable[[int | None], None] | None = None) -> int:
    """Write the body of `resp` to `dest` (truncating it), refusing more than `max_bytes`. Returns the size.
    `on_size` hears the declared Content-Length (None: not declared) before any byte is written."""
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise RefAudioTooLargeError(f"reference audio {what} is {declared} bytes; the limit is {max_bytes}")
    if on_size is not None:
        on_size(declared)
    total = 0
    try:
        async with aiofiles.open(dest, "wb") as out:
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                total += len(chunk)
                if total > max_bytes:
                    raise RefAudioTooLargeError(
                        f"reference audio {what} is larger than the limit of {max_bytes} bytes")
                await out.write(chunk)
    except OSError as exc:
        if isinstance(exc, (aiohttp.ClientError, ConnectionError, TimeoutError)):
            raise
        raise LocalStorageError(f"could not write {what} to local disk: {exc.strerror or type(exc).__name__}"
                                ) from None
    return total


def retry_after_s(headers: Any) -> float | None:
    """A numeric Retry-After header in seconds, else None (the HTTP-date form is ignored)."""
    value = headers.get("Retry-After") if headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def status_error(status: int, what: str, *, reading: bool, headers: Any = None) -> Exception:
    """The exception for an HTTP error status: `Transient` for 408/429/5xx, else a clear final error.

    `reading` is True for reference downloads (404/403 are the caller's problem) and False for writes and
    checks (the operator's bucket or credentials are wrong)."""
    if http_status_transient(status):
        return Transient(f"HTTP {status}", retry_after_s(headers), reason=status_reason(status))
    if 300 <= status < 400:
        return StorageRequestError(f"{what} answered with a redirect (HTTP {status}); redirects are not followed")
    if reading and status in (404, 410):
        return RefAudioNotFoundError(f"reference audio not found: {what}")
    if reading and status in (401, 403):
        return RefAudioForbiddenError(f"access to reference audio denied: {what} (HTTP {status})")
    return StorageRequestError(f"GCS refused the request for {what} (HTTP {status})")


def network_error(exc: BaseException, what: str) -> Exception:
    """Map a failure raised while talking to a server. Never includes str(exc): it may hold a signed URL."""
    if isinstance(exc, (StorageError, Transient)):
        return exc
    if isinstance(exc, aiohttp.ClientResponseError):
        return status_error(exc.status, what, reading=True, headers=exc.headers)
    if isinstance(exc, aiohttp.InvalidURL):
        return InvalidRefUrlError(f"ref_audio_url is not a valid URL: {what}")
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)):
        detail = type(exc).__name__
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, OSError) and os_error.strerror:
            detail += f": {os_error.strerror}"
        timed_out = isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))
        return Transient(detail, reason="timeout" if timed_out else "connection")
    return exc
