"""Local-filesystem backend: the embedded default when no bucket is configured, so the worker runs with no cloud
account. Objects live at `<LOCAL_STORAGE_DIR>/<bucket>/<object name>`; `gs://bucket/object` references read
from there (bucket allowed by ALLOWED_BUCKETS, default `local`), https references go over HTTP as in the GCS
backend. Writes are atomic (temp file + rename). Result URLs are `file://` URLs.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .audio import CONTENT_TYPES
from .backend import ObjectInfo, Storage
from .errors import (
    InvalidObjectNameError,
    LocalStorageError,
    RefAudioForbiddenError,
    RefAudioNotFoundError,
    RefAudioTooLargeError,
    StorageNotConfiguredError,
)
from .urls import RefLocation, validate_object_name


class LocalStorage(Storage):
    @property
    def root(self) -> Path:
        return self.config.local_dir

    def object_path(self, bucket: str, object_name: str) -> Path:
        """The file of an object; never outside `<root>/<bucket>` (names are validated, symlinks resolved)."""
        validate_object_name(object_name)
        base = (self.root / bucket).resolve()
        path = (base / object_name).resolve()
        if not path.is_relative_to(base):
            raise InvalidObjectNameError(f"object name {object_name!r} leaves the bucket folder")
        return path

    async def _download_object(self, location: RefLocation, dest: Path, max_bytes: int,
                               on_size: Callable[[int | None], None] | None = None) -> int:
        src = self.object_path(location.bucket, location.object_name)
        if on_size is not None:
            size = await asyncio.to_thread(_size_or_none, src)
            if size is not None:  # missing: _copy_capped says so, and nothing needs room
                on_size(size)  # here, on the event loop: the cache's bookkeeping is not thread-safe
        return await asyncio.to_thread(_copy_capped, src, dest, max_bytes, location.display)

    async def upload(self, data: bytes, object_name: str, content_type: str) -> None:
        path = self.object_path(self.bucket, self._check_object_name(object_name))
        await asyncio.to_thread(_write_atomic, path, bytes(data))

    async def signed_url(self, object_name: str, ttl_s: int | None = None) -> str:
        self._check_ttl(ttl_s)
        return self.object_path(self.bucket, self._check_object_name(object_name)).as_uri()

    async def metadata(self, object_name: str) -> ObjectInfo:
        name = self._check_object_name(object_name)
        path = self.object_path(self.bucket, name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise RefAudioNotFoundError(f"object not found: gs://{self.bucket}/{name}") from None
        content_type = (CONTENT_TYPES.get(path.suffix.lower().lstrip("."))
                        or mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        return ObjectInfo(self.bucket, name, size, content_type)

    async def check(self) -> None:
        folder = self.root / self.bucket
        try:
            await asyncio.to_thread(_probe_writable, folder)
        except OSError as exc:
            raise StorageNotConfiguredError(
                f"LOCAL_STORAGE_DIR {self.root} is not usable: {exc.strerror or type(exc).__name__}") from None


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None  # _copy_capped reports the reason


def _copy_capped(src: Path, dest: Path, max_bytes: int, what: str) -> int:
    try:
        fin = open(src, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RefAudioNotFoundError(f"reference audio not found: {what}") from None
    except PermissionError:
        raise RefAudioForbiddenError(f"access to reference audio denied: {what}") from None
    with fin:
        size = os.fstat(fin.fileno()).st_size
        if size > max_bytes:
            raise RefAudioTooLargeError(f"reference audio {what} is {size} bytes; the limit is {max_bytes}")
        try:
            with open(dest, "wb") as fout:
                copied = 0
                while chunk := fin.read(1024 * 1024):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise RefAudioTooLargeError(
                            f"reference audio {what} is larger than the limit of {max_bytes} bytes")
                    fout.write(chunk)
                return copied
        except OSError as exc:
            raise LocalStorageError(f"could not copy {what}: {exc.strerror or type(exc).__name__}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalStorageError(f"could not write {path.name}: {exc.strerror or type(exc).__name__}") from None


def _probe_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe.{secrets.token_hex(4)}"
    probe.write_bytes(b"")
    probe.unlink()

