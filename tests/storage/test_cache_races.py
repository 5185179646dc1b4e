"""ReferenceCache under concurrency: pins that no other download's eviction can break, and the byte bound
counting downloads in flight. The fake downloader yields control at random points, like a real network."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from storage import ReferenceCache, UrlPolicy, parse_ref_url
from storage.urls import RefLocation

BUCKET = "voices-bucket"
SIZE = 1000


class YieldingStorage:
    """Downloads that take a random number of event-loop turns; declares the size first (like Content-Length)
    unless `declare` is False."""

    def __init__(self, seed: int = 0, declare: bool = True) -> None:
        self.policy = UrlPolicy(frozenset({BUCKET}))
        self.rng = random.Random(seed)
        self.declare = declare
        self.gate: asyncio.Event | None = None
        self.started = 0

    def parse_ref_url(self, url: str) -> RefLocation:
        return parse_ref_url(url, self.policy)

    async def download(self, url, dest_path, max_bytes=None, *, on_size=None) -> int:
        location = url if isinstance(url, RefLocation) else self.parse_ref_url(url)
        data = location.object_name.encode().ljust(SIZE, b".")
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)
        if on_size is not None:
            on_size(len(data) if self.declare else None)
        Path(dest_path).write_bytes(data[: SIZE // 2])  # part of it lands before the rest
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)
        Path(dest_path).write_bytes(data)
        return len(data)

    async def check_access(self, url) -> None:
        await asyncio.sleep(0)


def gs(i: int) -> str:
    return f"gs://{BUCKET}/v{i}.wav"


def disk_bytes(root: Path) -> int:
    total = 0
    for p in root.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


async def test_churning_voices_never_hand_out_a_deleted_file(tmp_path):
    """Jobs of many voices through a cache that holds three: every `use` block must be able to read its file
    (the handler decodes it there), however the downloads and evictions interleave."""
    cache = ReferenceCache(tmp_path, 3 * SIZE, YieldingStorage(seed=1))
    rng = random.Random(2)
    failures: list[str] = []

    async def job(n: int) -> None:
        voice = rng.randrange(24)
        try:
            async with cache.use(f"voice{voice}", gs(voice)) as ref:
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)
                assert ref.path.read_bytes().startswith(f"v{voice}.wav".encode())
        except Exception as exc:  # noqa: BLE001
            failures.append(f"job {n}: {type(exc).__name__}")

    await asyncio.gather(*(job(n) for n in range(600)))
    assert failures == []
    assert cache.bytes <= 3 * SIZE and disk_bytes(tmp_path) <= 3 * SIZE
    assert all(entry.pins == 0 for entry in cache._index.values())


async def test_waiters_that_give_up_leave_no_pin_behind(tmp_path):
    storage = YieldingStorage()
    storage.gate = asyncio.Event()
    cache = ReferenceCache(tmp_path, 2 * SIZE, storage)
    jobs = [asyncio.create_task(cache.get("a", gs(0))) for _ in range(5)]
    while storage.started == 0:
        await asyncio.sleep(0)
    for job in jobs[:3]:
        job.cancel()
    storage.gate.set()
    await asyncio.gather(*jobs, return_exceptions=True)
    assert [entry.pins for entry in cache._index.values()] == [0]
    await cache.get("b", gs(1))
    await cache.get("c", gs(2))  # the unpinned "a" is evictable
    assert cache.bytes == 2 * SIZE and cache.entries == 2


async def test_downloads_in_flight_count_against_the_bound(tmp_path):
    """Five entries fill the cache; four downloads start: their reservations evict four entries before a byte
    of theirs is written, so disk use (entries + partial files) never exceeds the bound."""
    storage = YieldingStorage()
    cache = ReferenceCache(tmp_path, 5 * SIZE, storage, max_ref_bytes=SIZE)
    for i in range(5):
        await cache.get(f"old{i}", gs(i))
    storage.gate, storage.started = asyncio.Event(), 0
    jobs = [asyncio.create_task(cache.get(f"new{i}", gs(10 + i))) for i in range(4)]
    while storage.started < 4:
        await asyncio.sleep(0)
    assert disk_bytes(tmp_path) <= 5 * SIZE  # entries + the halves already written
    assert cache.reserved_bytes == 4 * SIZE and cache.bytes == SIZE and cache.evictions == 4
    storage.gate.set()
    await asyncio.gather(*jobs)
    assert cache.reserved_bytes == 0 and cache.bytes == 5 * SIZE == disk_bytes(tmp_path)


async def test_an_undeclared_size_reserves_max_ref_bytes(tmp_path):
    storage = YieldingStorage(declare=False)
    cache = ReferenceCache(tmp_path, 10 * SIZE, storage, max_ref_bytes=4 * SIZE)
    for i in range(8):
        await cache.get(f"old{i}", gs(i))
    storage.gate, storage.started = asyncio.Event(), 0
    job = asyncio.create_task(cache.get("new", gs(20)))
    while storage.started < 1:
        await asyncio.sleep(0)
    assert cache.reserved_bytes == 4 * SIZE and cache.bytes == 6 * SIZE  # two evicted to make room
    storage.gate.set()
    await job
    assert cache.reserved_bytes == 0 and cache.bytes == 7 * SIZE  # settled to the real size


async def test_reservations_beyond_the_bound_still_download_and_the_bound_returns(tmp_path):
    """The rule when pinned entries and reservations alone exceed the bound: downloads are not held back; the
    bound is restored as soon as they land and pins are released."""
    storage = YieldingStorage()
    cache = ReferenceCache(tmp_path, 2 * SIZE, storage, max_ref_bytes=SIZE)
    async with cache.use("pinned", gs(0)):
        storage.gate = asyncio.Event()
        jobs = [asyncio.create_task(cache.get(f"new{i}", gs(10 + i))) for i in range(3)]
        while storage.started < 4:  # 1 (the pinned one) + 3
            await asyncio.sleep(0)
        assert cache.bytes + cache.reserved_bytes == 4 * SIZE  # over the bound: nothing left to evict
        storage.gate.set()
        refs = await asyncio.gather(*jobs)
        assert all(r.size == SIZE for r in refs)
    async with cache.use("again", gs(30)):
        pass
    assert cache.bytes <= 2 * SIZE and disk_bytes(tmp_path) <= 2 * SIZE
