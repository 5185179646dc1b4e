"""Storing a generated result: name it, upload it, sign a URL for it.

Object names follow the seed: `generated/{voice_id}_{YYYYmmdd_HHMMSS}_{8 hex}.{ext}` (timestamp in UTC).
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Protocol

from .audio import CONTENT_TYPES, normalize_format
from .urls import RESULTS_PREFIX, validate_voice_id

RESULT_PREFIX = RESULTS_PREFIX  # storage.urls refuses references under it


class ResultStore(Protocol):
    """What `store_result` calls: any `storage.Storage` backend is one."""

    async def upload(self, data: bytes, object_name: str, content_type: str) -> None: ...

    async def signed_url(self, object_name: str, ttl_s: int | None = None) -> str: ...


@dataclass(frozen=True)
class StoredResult:
    object_name: str
    url: str
    content_type: str
    size: int


def result_object_name(voice_id: str, fmt: str, now: dt.datetime | None = None, suffix: str | None = None) -> str:
    """`generated/{voice_id}_{YYYYmmdd_HHMMSS}_{8 hex}.{ext}`; `now` defaults to the current UTC time."""
    validate_voice_id(voice_id)
    ext = normalize_format(fmt)
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d_%H%M%S")
    tail = suffix if suffix is not None else secrets.token_hex(4)
    if len(tail) != 8 or any(c not in "0123456789abcdef" for c in tail):
        raise ValueError(f"suffix must be 8 lower-case hex digits, got {tail!r}")
    return f"{RESULT_PREFIX}{voice_id}_{stamp}_{tail}.{ext}"


async def store_result(storage: ResultStore, voice_id: str, data: bytes, fmt: str = "wav",
                       ttl_s: int | None = None, *, now: dt.datetime | None = None) -> StoredResult:
    """Upload encoded audio `data` (retried like every storage call) and return its name and a URL valid
    `ttl_s` seconds (default SIGNED_URL_TTL_S): V4-signed on GCS, `file://` on the local backend."""
    ext = normalize_format(fmt)
    name = result_object_name(voice_id, ext, now)
    content_type = CONTENT_TYPES[ext]
    await storage.upload(data, name, content_type)
    url = await storage.signed_url(name, ttl_s)
    return StoredResult(name, url, content_type, len(data))
