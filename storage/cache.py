"""Reference-audio disk cache: `voice_id` + reference -> a file on local disk, bounded, LRU, single-flight.

Data flow of `use(voice_id, url)` (and `get`, which is `use` released at once):
    validate voice_id and url (no I/O) -> key = sha256(voice_id, gs://bucket/object)[:32]
    -> hit: the file `<root>/<key>.<content sha256>.ref`, marked most recently used and pinned at once
    -> miss: ONE download task per key (concurrent callers wait for it) streams to `<root>/.<key>.<rand>.part`,
       hashes and fsyncs it, renames it into place, pins it for every caller still waiting, then evicts
       least-recently-used entries above the bound
    -> access rule (below), then the caller gets the file, pinned until its block ends.

Access rule. The key holds the object's identity (`RefLocation.cache_key`), not the URL: the same voice_id with a
different reference is downloaded again, and a re-signed URL of the same object is a hit. So a hit, or a wait on a
download another caller started with a different URL, never takes the caller's word for access:
- an `https` reference is served only after `storage.check_access(location)` accepts THIS caller's URL (one
  `Range: bytes=0-0` GET under the download URL policy: allowed hosts/buckets, connect-time address guard, no
  redirects, same timeout and retries). A refusal raises what a download of that URL would (403 ->
  `ref_audio_forbidden`, 404 -> `ref_audio_not_found`, ...) and the caller gets nothing. The check is per caller,
  never shared: single-flight shares downloads, not permissions. The caller whose own URL was downloaded (or one
  sending the identical URL) needs no check: the download was the check.
- a `gs://` reference is read with the service's own credentials and is governed by ALLOWED_BUCKETS, checked when
  the URL is parsed: no request is made on a hit.

Bound (`max_bytes`): entries on disk + reservations of downloads in flight. Once a download's source answers
and before it writes a byte (`on_size` from `Storage.download`), it reserves the size the source declares
(Content-Length, file size), or `max_ref_bytes` when none is declared (never more: the download is capped there);
when the file lands the reservation becomes the entry's real size. Whenever reservations or entries grow, least-
recently-used UNPINNED entries are evicted until the total fits. A download never waits for room: when pinned
entries and reservations alone exceed the bound, every unpinned entry is evicted and the download still runs;
the excess lasts only until downloads land and pins are released, each of which evicts back to the bound (the
entry just downloaded is kept even then, so its waiters get it). Disk use therefore never exceeds
max(max_bytes, pinned entries + in-flight reservations + the entry just written).

- File names are hex digests: a voice_id can never reach the file system.
- A crash mid-download leaves only a `.part` file, which is never read as an entry and is deleted at start.
- The index is rebuilt from the folder at start (recency from mtime, which every use refreshes).
- A failed download fails every caller waiting on it; the next call tries again.
- Pins: `use()` holds one for its block. A waiter's pin is taken by the download task itself, in the same step
  that indexes the file (no await in between), so no other download's eviction can delete a file between the
  download finishing and its waiters resuming. `get()` releases its pin before returning: its path may be evicted
  by later downloads (use `use()` to read the file).
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
from collections.abc import AsyncIterator, Callable
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
                       *, on_size: Callable[[int | None], None] | None = None) -> int: ...

    async def check_access(self, url: str | RefLocation) -> None: ...


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
    reserved_bytes: int = 0  # reservations of downloads in flight
    access_checks: int = 0  # https callers whose own URL was checked before a cached file was served
    access_refusals: int = 0  # ... and were refused (or the check itself failed)


@dataclass(eq=False)
class _Entry:
    path: Path
    sha256: str
    size: int
    pins: int = 0
    dropped: bool = False  # left the index while pinned: the file is deleted with the last pin


class _Flight:
    """One download in flight for a key, and the callers waiting on it."""

    def __init__(self, location: RefLocation) -> None:
        self.location = location  # its URL's access is proven by the download itself
        self.waiters = 0  # callers the download task pins the entry for when it lands
        self.reserved = 0  # bytes of the bound held for it
        self.task: asyncio.Task[_Entry] | None = None


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
        self._inflight: dict[str, _Flight] = {}
        self._bytes = 0
        self._reserved = 0
        self.hits = 0
        self.misses = 0
        self.downloads = 0
        self.download_failures = 0
        self.evictions = 0
        self.access_checks = 0
        self.access_refusals = 0
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

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def stats(self) -> CacheStats:
        """Counters for metrics. `misses` counts calls not served from disk (every waiter of a shared download);
        `downloads` counts downloads actually started; `bytes`/`entries` describe what is on disk now."""
        return CacheStats(self.hits, self.misses, self.downloads, self.download_failures, self.evictions,
                          len(self._index), self._bytes, self._reserved, self.access_checks, self.access_refusals)

    async def get(self, voice_id: str, url: str | RefLocation) -> CachedReference:
        """The reference for `voice_id` at `url`, downloading it once if missing. Raises `StorageError`s.
        Not pinned once returned: read the file inside `use()` instead when other downloads may run."""
        ref, entry = await self._acquire(voice_id, url)
        self._release(entry, evict=False)  # evicting now could delete the file we are about to return
        return ref

    @contextlib.asynccontextmanager
    async def use(self, voice_id: str, url: str | RefLocation) -> AsyncIterator[CachedReference]:
        """Like `get`, and the entry is not evicted until the block ends."""
        ref, entry = await self._acquire(voice_id, url)
        try:
            yield ref
        finally:
            self._release(entry)

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
        tasks = [flight.task for flight in self._inflight.values() if flight.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------------------------
    def _key(self, voice_id: str, url: str | RefLocation) -> tuple[str, RefLocation]:
        validate_voice_id(voice_id)
        location = url if isinstance(url, RefLocation) else self.storage.parse_ref_url(url)
        digest = hashlib.sha256(f"{voice_id}\0{location.cache_key}".encode()).hexdigest()[:32]
        return digest, location

    async def _acquire(self, voice_id: str, url: str | RefLocation) -> tuple[CachedReference, _Entry]:
        """Find or download the entry, pinned for the caller, and apply the access rule. The caller releases."""
        key, location = self._key(voice_id, url)
        entry = self._lookup(key)
        if entry is not None:
            entry.pins += 1  # no await between finding the entry and pinning it
            self.hits += 1
            hit = True
            needs_check = location.scheme != "gs"
        else:
            self.misses += 1
            flight = self._inflight.get(key)
            if flight is None:
                flight = _Flight(location)
                flight.task = asyncio.get_running_loop().create_task(self._fill(key, location, flight))
                flight.task.add_done_callback(_consume_exception)
                self._inflight[key] = flight
            needs_check = location.scheme != "gs" and location.fetch_url != flight.location.fetch_url
            entry = await self._wait(flight)
            hit = False
        if needs_check:
            try:
                self.access_checks += 1
                await self.storage.check_access(location)
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    self.access_refusals += 1
                self._release(entry)
                raise
        return CachedReference(entry.path, entry.sha256, entry.size, hit=hit), entry

    async def _wait(self, flight: _Flight) -> _Entry:
        """Wait for `flight`; the entry comes back pinned for this caller (the download task pinned it)."""
        assert flight.task is not None
        task = flight.task
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        except BaseException:
            if not task.done():
                flight.waiters -= 1  # gave up before the file landed: nobody pinned it for us
            elif not task.cancelled() and task.exception() is None:
                self._release(task.result())  # landed, pinned for us, but we are not there to use it
            raise

    def _release(self, entry: _Entry, evict: bool = True) -> None:
        entry.pins -= 1
        if entry.pins > 0:
            return
        if entry.dropped:
            with contextlib.suppress(OSError):
                entry.path.unlink(missing_ok=True)
        elif evict:
            self._evict()

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

    def _reserve(self, flight: _Flight, size: int) -> None:
        """Set the bytes held for `flight` to `size`; evict to make room when it grows."""
        size = max(0, min(size, self.max_ref_bytes))
        grew = size > flight.reserved
        self._reserved += size - flight.reserved
        flight.reserved = size
        if grew:
            self._evict()

    async def _fill(self, key: str, location: RefLocation, flight: _Flight) -> _Entry:
        tmp = self.root / f".{key}.{secrets.token_hex(4)}{_PART_SUFFIX}"
        settled = False

        def on_size(declared: int | None) -> None:
            if not settled:
                self._reserve(flight, self.max_ref_bytes if declared is None else declared)

        try:
            self.downloads += 1
            size = await self.storage.download(location, tmp, self.max_ref_bytes, on_size=on_size)
            sha256 = await asyncio.to_thread(_hash_and_sync, tmp)
            final = self.root / f"{key}.{sha256}.ref"
            os.replace(tmp, final)
        except BaseException:
            self.download_failures += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        finally:
            settled = True
            self._reserved -= flight.reserved
            flight.reserved = 0
            if self._inflight.get(key) is flight:
                del self._inflight[key]
        # From here to the return there is no await: indexing, pinning for the waiters and evicting are one step.
        old = self._index.get(key)
        if old is not None and old.path != final:
            self._remove(key)
        entry = self._index.get(key)
        if entry is None:
            entry = self._index[key] = _Entry(final, sha256, size)
            self._bytes += size
        self._index.move_to_end(key)
        entry.pins += flight.waiters
        self._evict(protect=key)
        return entry

    def _evict(self, protect: str | None = None) -> None:
        """Remove least-recently-used unpinned entries until entries + reservations fit the bound."""
        if self._bytes + self._reserved <= self.max_bytes:
            return
        for key in list(self._index):
            if self._bytes + self._reserved <= self.max_bytes:
                break
            entry = self._index[key]
            if entry.pins or key == protect:
                continue
            self._remove(key)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        entry = self._index.pop(key)
        self._bytes -= entry.size
        if entry.pins:
            entry.dropped = True  # a reader holds it: deleted when released
            return
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
