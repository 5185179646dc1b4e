"""Reference-audio disk cache: `voice_id` + reference -> a file on local disk, bounded, LRU, single-flight.

Data flow of `get(voice_id, url)`:
    validate voice_id and url (no I/O) -> key = sha256(voice_id, gs://bucket/object)[:32]
    -> hit: the file `<root>/<key>.<content sha256>.ref`, marked most recently used
    -> miss: ONE download task per key (concurrent callers wait for it) streams to `<root>/.<key>.<rand>.part`,
       hashes and fsyncs it, renames it into place, then evicts least-recently-used entries above the bound.

- The key holds the reference's object identity (`RefLocation.cache_key`), so the same voice_id sent with a
  different reference is downloaded again, and a re-signed URL of the same object is still a hit.
- File names are hex digests: a voice_id can never reach the file system.
- A crash mid-download leaves only a `.part` file, which is never read as an entry and is deleted at start.
- The index is rebuilt from the folder at start (recency from mtime, which every use refreshes).
- A failed download fails every caller waiting on it; the next call tries again.
- `use()` pins an entry while it is read; pinned entries are evicted when released, so the bound can be exceeded
  only while entries are pinned. `get()` does not pin: its path may be evicted by later downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import LocalStorageError
from .urls import RefLocation, validate_voice_id

log = logging.getLogger(__name__)

_ENTRY_RE = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{64})\.ref")
_PART_SUFFIX = ".part"


class _Downloader(Protocol):
    def parse_ref_url(self, url: str) -> RefLocation: ...

    async def download(self, url: str | RefLocation, dest_path: os.PathLike[str], max_bytes: int | None = None,
                       ) -> int: ...


@dataclass(frozen=True)
class CachedReference:
    path: Path
    sha256: str  # of the file content: the speaker-latent cache keys on it
    size: int
    hit: bool


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    downloads: int
    download_failures: int
    evictions: int
    entries: int
    bytes: int


@dataclass
class _Entry:
    path: Path
    sha256: str
    size: int
    pins: int = 0


class ReferenceCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int, storage: _Downloader,
                 max_ref_bytes: int | None = None) -> None:
        """Open (creating it if needed) the cache at `root` and rebuild its index from disk.

        `max_ref_bytes` caps one download (default: `max_bytes`) and may not exceed `max_bytes`."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_ref_bytes = max_bytes if max_ref_bytes is None else max_ref_bytes
        if not 1 <= self.max_ref_bytes <= max_bytes:
            raise ValueError(f"max_ref_bytes must be in 1..max_bytes ({max_bytes}), got {self.max_ref_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.storage = storage
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.downloads = 0
        self.download_failures = 0
        self.evictions = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalStorageError(
                f"AUDIO_CACHE_DIR {self.root} cannot be created: {exc.strerror or type(exc).__name__}") from None
        self._rebuild()

    # -- public --------------------------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        return len(self._index)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        """Counters for metrics. `misses` counts calls not served from disk (every waiter of a shared download);
        `downloads` counts downloads actually started; `bytes`/`entries` describe what is on disk now."""
        return CacheStats(self.hits, self.misses, self.downloads, self.download_failures, self.evictions,
                          len(self._index), self._bytes)

    async def get(self, voice_id: str, url: str | RefLocation) -> CachedReference:
        """The reference for `voice_id` at `url`, downloading it once if missing. Raises `StorageError`s."""
        key, location = self._key(voice_id, url)
        entry = self._lookup(key)
        if entry is not None:
            self.hits += 1
            return CachedReference(entry.path, entry.sha256, entry.size, hit=True)
        self.misses += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(key, location))
            task.add_done_callback(_consume_exception)
            self._inflight[key] = task
        entry = await asyncio.shield(task)
        return CachedReference(entry.path, entry.sha256, entry.size, hit=False)

    @contextlib.asynccontextmanager
    async def use(self, voice_id: str, url: str | RefLocation) -> AsyncIterator[CachedReference]:
        """Like `get`, and the entry is not evicted until the block ends."""
        ref = await self.get(voice_id, url)
        key, _ = self._key(voice_id, url)
        entry = self._index.get(key)
        if entry is not None and entry.path == ref.path:
            entry.pins += 1
        try:
            yield ref
        finally:
            if entry is not None and entry.path == ref.path:
                entry.pins -= 1
                if entry.pins == 0:
                    self._evict()

    def discard(self, voice_id: str, url: str | RefLocation) -> bool:
        """Drop the entry (e.g. it did not decode as audio), so the next `get` downloads again."""
        key, _ = self._key(voice_id, url)
        entry = self._index.get(key)
        if entry is None or entry.pins:
            return False
        self._remove(key)
        return True

    async def close(self) -> None:
        """Cancel downloads in flight (their temp files are removed)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------------------------
    def _key(self, voice_id: str, url: str | RefLocation) -> tuple[str, RefLocation]:
        validate_voice_id(voice_id)
        location = url if isinstance(url, RefLocation) else self.storage.parse_ref_url(url)
        digest = hashlib.sha256(f"{voice_id}\0{location.cache_key}".encode()).hexdigest()[:32]
        return digest, location

    def _lookup(self, key: str) -> _Entry | None:
        entry = self._index.get(key)
        if entry is None:
            return None
        try:
            os.utime(entry.path)  # persists recency for the next start
        except FileNotFoundError:
            log.warning("cache entry %s vanished from disk; downloading again", entry.path.name)
            self._remove(key)
            return None
        except OSError:
            pass
        self._index.move_to_end(key)
        return entry

    async def _fill(self, key: str, location: RefLocation) -> _Entry:
        tmp = self.root / f".{key}.{secrets.token_hex(4)}{_PART_SUFFIX}"
        try:
            self.downloads += 1
            size = await self.storage.download(location, tmp, self.max_ref_bytes)
            sha256 = await asyncio.to_thread(_hash_and_sync, tmp)
            final = self.root / f"{key}.{sha256}.ref"
            os.replace(tmp, final)
        except BaseException:
            self.download_failures += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._inflight.pop(key, None)
        if key in self._index and self._index[key].path != final:
            self._remove(key)
        if key not in self._index:
            self._bytes += size
        self._index[key] = _Entry(final, sha256, size)
        self._index.move_to_end(key)
        self._evict(protect=key)
        return self._index.get(key) or _Entry(final, sha256, size)

    def _evict(self, protect: str | None = None) -> None:
        """Remove least-recently-used unpinned entries until the total fits the bound."""
        if self._bytes <= self.max_bytes:
            return
        for key in list(self._index):
            if self._bytes <= self.max_bytes:
                break
            entry = self._index[key]
            if entry.pins or key == protect:
                continue
            self._remove(key)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        entry = self._index.pop(key)
        self._bytes -= entry.size
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()

    def _rebuild(self) -> None:
        """Index the entries on disk (oldest mtime = least recently used); delete leftovers of crashes."""
        found: list[tuple[float, str, _Entry]] = []
        for path in self.root.iterdir():
            name = path.name
            if name.startswith(".") and name.endswith(_PART_SUFFIX):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            match = _ENTRY_RE.fullmatch(name)
            if match is None:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((st.st_mtime, name, _Entry(path, match.group(2), st.st_size)))
        found.sort(key=lambda item: (item[0], item[1]))
        for _, name, entry in found:
            key = name[:32]
            if key in self._index:  # two contents for one key: the newer wins
                self._remove(key)
            self._index[key] = entry
            self._bytes += entry.size
        before = self.evictions
        self._evict()
        if found:
            log.info("reference cache: %d entries, %d bytes (%d evicted at start)",
                     len(self._index), self._bytes, self.evictions - before)


def _hash_and_sync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _consume_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
