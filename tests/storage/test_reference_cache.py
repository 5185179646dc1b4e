"""ReferenceCache with a fake downloader: LRU bound, restart, atomic writes, single-flight, pins, keys.

The fake implements the same two calls the cache makes on a real Storage (parse_ref_url, download) and can be
held at a gate or told to fail, so concurrency is driven step by step without sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from storage import (
    InvalidRefUrlError,
    InvalidVoiceIdError,
    RefAudioForbiddenError,
    RefAudioNotFoundError,
    ReferenceCache,
    StorageUnavailableError,
    UrlPolicy,
    parse_ref_url,
)
from storage.urls import RefLocation

BUCKET = "voices-bucket"


class FakeStorage:
    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects = dict(objects or {})
        self.policy = UrlPolicy(frozenset({BUCKET}))
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None
        self.checks: list[str] = []
        self.valid_signatures = {"aaaa", "bbbb"}

    def parse_ref_url(self, url: str) -> RefLocation:
        return parse_ref_url(url, self.policy)

    async def download(self, url, dest_path, max_bytes=None, *, on_size=None) -> int:
        location = url if isinstance(url, RefLocation) else self.parse_ref_url(url)
        self.calls.append(location.cache_key)
        data = self.objects.get(location.object_name)
        if data is not None and on_size is not None:
            on_size(len(data))  # as a Content-Length would
        Path(dest_path).write_bytes((data or b"")[: len(data or b"") // 2])  # a half-written file first
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if data is None:
            raise RefAudioNotFoundError(f"reference audio not found: {location.display}")
        Path(dest_path).write_bytes(data)
        return len(data)

    async def check_access(self, url) -> None:
        """Stands in for the ranged GET: an https URL is granted when its signature is in `valid_signatures`."""
        location = url if isinstance(url, RefLocation) else self.parse_ref_url(url)
        self.checks.append(location.display)
        if location.scheme == "gs":
            return
        query = parse_qs(urlsplit(location.fetch_url or "").query)
        if query.get("X-Goog-Signature", [""])[0] not in self.valid_signatures:
            raise RefAudioForbiddenError(f"access to reference audio denied: {location.display} (HTTP 403)")
        if location.object_name not in self.objects:
            raise RefAudioNotFoundError(f"reference audio not found: {location.display}")


def gs(name: str) -> str:
    return f"gs://{BUCKET}/{name}"


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file())


@pytest.fixture
def objects() -> dict[str, bytes]:
    return {f"v{i}.wav": bytes([i]) * 1000 for i in range(10)}


async def test_miss_then_hit_returns_the_same_file_and_content_hash(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    first = await cache.get("joao", gs("v1.wav"))
    second = await cache.get("joao", gs("v1.wav"))
    assert (first.hit, second.hit) == (False, True)
    assert first.path == second.path and first.path.parent == tmp_path
    assert first.sha256 == hashlib.sha256(objects["v1.wav"]).hexdigest() == second.sha256
    assert first.path.read_bytes() == objects["v1.wav"] and first.size == 1000
    assert cache.storage.calls == [gs("v1.wav")]
    assert (cache.hits, cache.misses, cache.downloads, cache.entries, cache.bytes) == (1, 1, 1, 1, 1000)


async def test_same_voice_with_a_different_reference_is_not_served_the_old_audio(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    old = await cache.get("joao", gs("v1.wav"))
    new = await cache.get("joao", gs("v2.wav"))
    assert not new.hit and new.sha256 != old.sha256
    assert new.path.read_bytes() == objects["v2.wav"]


async def test_a_resigned_url_of_the_same_object_is_a_hit(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    base = f"https://storage.googleapis.com/{BUCKET}/v3.wav"
    await cache.get("maria", f"{base}?X-Goog-Date=1&X-Goog-Signature=aaaa")
    again = await cache.get("maria", f"{base}?X-Goog-Date=2&X-Goog-Signature=bbbb")
    via_gs = await cache.get("maria", gs("v3.wav"))
    assert again.hit and via_gs.hit and len(storage.calls) == 1


async def test_lru_eviction_keeps_disk_within_the_bound_after_every_write(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 3_500, FakeStorage(objects))  # room for three 1000-byte entries
    first = [await cache.get(f"voice{i}", gs(f"v{i}.wav")) for i in range(3)]
    assert (await cache.get("voice0", gs("v0.wav"))).hit  # a read is a use: voice1 is now the oldest
    await cache.get("voice3", gs("v3.wav"))
    assert [ref.path.exists() for ref in first] == [True, False, True]
    assert disk_bytes(tmp_path) <= 3_500
    for i in range(4, 8):
        await cache.get(f"voice{i}", gs(f"v{i}.wav"))
        assert disk_bytes(tmp_path) <= 3_500 and cache.bytes == disk_bytes(tmp_path)
    assert cache.entries == 3 and cache.evictions == 5
    assert (await cache.get("voice7", gs("v7.wav"))).hit
    assert not (await cache.get("voice1", gs("v1.wav"))).hit


async def test_read_order_decides_eviction(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 2_000, storage)
    await cache.get("a", gs("v0.wav"))
    await cache.get("b", gs("v1.wav"))
    await cache.get("a", gs("v0.wav"))  # use a: b becomes least recently used
    await cache.get("c", gs("v2.wav"))
    assert (await cache.get("a", gs("v0.wav"))).hit
    assert not (await cache.get("b", gs("v1.wav"))).hit


async def test_restart_keeps_entries_and_their_recency(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 3_000, storage)
    for i in range(3):
        await cache.get(f"voice{i}", gs(f"v{i}.wav"))
        os.utime(cache._index[next(reversed(cache._index))].path, (1000 + i, 1000 + i))  # distinct mtimes
    hit = await cache.get("voice0", gs("v0.wav"))  # touched now: most recent on disk too
    restarted = ReferenceCache(tmp_path, 3_000, FakeStorage(objects))
    assert (restarted.entries, restarted.bytes) == (3, 3000)
    again = await restarted.get("voice0", gs("v0.wav"))
    assert again.hit and again.sha256 == hit.sha256 and again.path == hit.path
    await restarted.get("voice9", gs("v9.wav"))  # evicts voice1, the least recently used before the restart
    assert not (await restarted.get("voice1", gs("v1.wav"))).hit
    assert restarted.storage.calls == [gs("v9.wav"), gs("v1.wav")]


async def test_restart_with_a_smaller_bound_evicts_at_start(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    for i in range(5):
        await cache.get(f"voice{i}", gs(f"v{i}.wav"))
    smaller = ReferenceCache(tmp_path, 2_000, FakeStorage(objects))
    assert smaller.entries == 2 and disk_bytes(tmp_path) == 2_000


async def test_a_crash_mid_download_leaves_no_entry(tmp_path, objects):
    """What a killed process leaves (a .part file) is never an entry and is cleaned at the next start."""
    (tmp_path / (".%s.0badc0de.part" % ("0" * 32))).write_bytes(b"half a voice")
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    assert cache.entries == 0 and list(tmp_path.iterdir()) == []


async def test_a_cancelled_download_leaves_no_file_and_the_next_call_downloads(tmp_path, objects):
    storage = FakeStorage(objects)
    storage.gate = asyncio.Event()
    cache = ReferenceCache(tmp_path, 10_000, storage)
    job = asyncio.create_task(cache.get("joao", gs("v1.wav")))
    await storage.started.wait()
    assert [p.suffix for p in tmp_path.iterdir()] == [".part"]  # the half file exists mid-download
    await cache.close()  # worker shutdown cancels in-flight downloads
    with pytest.raises(asyncio.CancelledError):
        await job
    assert list(tmp_path.iterdir()) == [] and cache.entries == 0
    storage.gate.set()
    assert not (await cache.get("joao", gs("v1.wav"))).hit


async def test_single_flight_one_download_for_concurrent_callers(tmp_path, objects):
    storage = FakeStorage(objects)
    storage.gate = asyncio.Event()
    cache = ReferenceCache(tmp_path, 10_000, storage)
    jobs = [asyncio.create_task(cache.get("joao", gs("v1.wav"))) for _ in range(16)]
    await storage.started.wait()
    await asyncio.sleep(0)
    assert not any(job.done() for job in jobs)  # all 16 wait for the one download
    storage.gate.set()
    results = await asyncio.gather(*jobs)
    assert storage.calls == [gs("v1.wav")]
    assert len({r.path for r in results}) == 1 and not any(r.hit for r in results)


async def test_a_failed_download_fails_all_waiters_and_the_next_job_retries(tmp_path, objects):
    storage = FakeStorage(objects)
    storage.gate = asyncio.Event()
    storage.fail_with = StorageUnavailableError("download of gs://voices-bucket/v1.wav failed")
    cache = ReferenceCache(tmp_path, 10_000, storage)
    jobs = [asyncio.create_task(cache.get("joao", gs("v1.wav"))) for _ in range(5)]
    await storage.started.wait()
    storage.gate.set()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert all(isinstance(r, StorageUnavailableError) for r in results)
    assert len(storage.calls) == 1 and list(tmp_path.iterdir()) == []
    assert cache.download_failures == 1
    storage.fail_with = None
    assert (await cache.get("joao", gs("v1.wav"))).path.read_bytes() == objects["v1.wav"]
    assert len(storage.calls) == 2


async def test_a_waiter_that_gives_up_does_not_cancel_the_download_for_others(tmp_path, objects):
    storage = FakeStorage(objects)
    storage.gate = asyncio.Event()
    cache = ReferenceCache(tmp_path, 10_000, storage)
    impatient = asyncio.create_task(cache.get("joao", gs("v1.wav")))
    patient = asyncio.create_task(cache.get("joao", gs("v1.wav")))
    await storage.started.wait()
    impatient.cancel()
    storage.gate.set()
    assert (await patient).path.read_bytes() == objects["v1.wav"]
    assert impatient.cancelled() and len(storage.calls) == 1


async def test_missing_reference_error_reaches_the_caller(tmp_path):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage({}))
    with pytest.raises(RefAudioNotFoundError, match="gs://voices-bucket/none.wav"):
        await cache.get("joao", gs("none.wav"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("voice_id", ["../../etc/passwd", "/abs/path", "..", "a/b", "x\x00y", "ü"])
async def test_unsafe_voice_ids_are_refused_before_any_io(tmp_path, objects, voice_id):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path / "cache", 10_000, storage)
    with pytest.raises(InvalidVoiceIdError):
        await cache.get(voice_id, gs("v1.wav"))
    assert storage.calls == [] and list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/", "file:///etc/passwd", "ftp://x/y.wav",
                                 "https://evil.example.com/x.wav",
                                 "https://storage.googleapis.com.evil.com/voices-bucket/x.wav"])
async def test_non_gcs_urls_are_refused_before_any_io(tmp_path, objects, url):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    with pytest.raises(InvalidRefUrlError):
        await cache.get("joao", url)
    assert storage.calls == [] and list(tmp_path.iterdir()) == []


async def test_file_names_never_contain_the_voice_id(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    ref = await cache.get("joao.formal-1", gs("v1.wav"))
    assert "joao" not in ref.path.name and ref.path.parent == tmp_path


async def test_pinned_entries_survive_eviction_until_released(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 2_000, FakeStorage(objects))
    async with cache.use("a", gs("v0.wav")) as pinned:
        await cache.get("b", gs("v1.wav"))
        await cache.get("c", gs("v2.wav"))  # over the bound; "a" is the oldest but pinned: "b" goes
        assert pinned.path.exists() and cache.bytes == 2_000
        async with cache.use("c", gs("v2.wav")) as also_pinned:
            await cache.get("d", gs("v3.wav"))  # nothing unpinned but d itself: over the bound while pinned
            assert cache.bytes == 3_000 and pinned.path.exists() and also_pinned.path.exists()
        assert cache.bytes == 2_000  # releasing c evicted it (least recently used unpinned)
        assert pinned.path.exists() and not also_pinned.path.exists()
    assert cache.bytes <= 2_000 and disk_bytes(tmp_path) <= 2_000


async def test_discard_forces_a_new_download(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    ref = await cache.get("joao", gs("v1.wav"))
    assert cache.discard("joao", gs("v1.wav"))
    assert not ref.path.exists() and cache.entries == 0
    assert not (await cache.get("joao", gs("v1.wav"))).hit and len(storage.calls) == 2


async def test_an_entry_deleted_behind_our_back_is_downloaded_again(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 10_000, FakeStorage(objects))
    (await cache.get("joao", gs("v1.wav"))).path.unlink()
    again = await cache.get("joao", gs("v1.wav"))
    assert not again.hit and again.path.exists() and cache.bytes == 1000


async def test_stats_snapshot(tmp_path, objects):
    cache = ReferenceCache(tmp_path, 1_000, FakeStorage(objects))
    await cache.get("a", gs("v0.wav"))
    await cache.get("a", gs("v0.wav"))
    await cache.get("b", gs("v1.wav"))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.downloads, stats.evictions, stats.entries, stats.bytes) == (
        1, 2, 2, 1, 1, 1000)


def test_one_reference_must_fit(tmp_path):
    with pytest.raises(ValueError, match="max_ref_bytes"):
        ReferenceCache(tmp_path, 100, FakeStorage(), max_ref_bytes=101)


# -- the access rule: a cached file is never served on the strength of someone else's URL --------------------
SIGNED = f"https://storage.googleapis.com/{BUCKET}/v3.wav?X-Goog-Date=1&X-Goog-Signature="


async def test_a_hit_with_a_forged_signature_is_refused_and_a_valid_one_is_served(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    first = await cache.get("maria", SIGNED + "aaaa")  # downloaded: the download was the check
    assert not first.hit and storage.checks == []
    with pytest.raises(RefAudioForbiddenError) as info:
        await cache.get("maria", SIGNED + "forged")
    assert info.value.error_code == "ref_audio_forbidden" and "forged" not in str(info.value)
    again = await cache.get("maria", SIGNED + "bbbb")  # a fresh, valid signature: a hit after one check
    assert again.hit and again.path == first.path
    assert len(storage.checks) == 2 and len(storage.calls) == 1  # never downloaded again
    assert (cache.access_checks, cache.access_refusals) == (2, 1)
    assert cache.stats().access_refusals == 1


async def test_gs_hits_need_no_check_and_https_hits_after_gs_do(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    await cache.get("maria", gs("v3.wav"))
    assert (await cache.get("maria", gs("v3.wav"))).hit and storage.checks == []
    with pytest.raises(RefAudioForbiddenError):
        await cache.get("maria", SIGNED + "expired")
    assert len(storage.checks) == 1


async def test_a_waiter_on_someone_elses_download_is_checked_too(tmp_path, objects):
    """Single-flight shares the download, not the permission: a forged URL that arrives while a valid one is
    downloading the same object is refused; the identical URL rides along with no extra request."""
    storage = FakeStorage(objects)
    storage.gate = asyncio.Event()
    cache = ReferenceCache(tmp_path, 10_000, storage)
    valid = asyncio.create_task(cache.get("maria", SIGNED + "aaaa"))
    await storage.started.wait()
    same = asyncio.create_task(cache.get("maria", SIGNED + "aaaa"))
    forged = asyncio.create_task(cache.get("maria", SIGNED + "forged"))
    via_gs = asyncio.create_task(cache.get("maria", gs("v3.wav")))
    await asyncio.sleep(0)
    storage.gate.set()
    results = await asyncio.gather(valid, same, forged, via_gs, return_exceptions=True)
    assert isinstance(results[2], RefAudioForbiddenError)
    assert all(r.path.read_bytes() == objects["v3.wav"] for r in (results[0], results[1], results[3]))
    assert len(storage.calls) == 1 and len(storage.checks) == 1  # only the forged one was checked


async def test_a_refused_caller_leaves_no_pin(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 1_000, storage)
    await cache.get("maria", SIGNED + "aaaa")
    with pytest.raises(RefAudioForbiddenError):
        async with cache.use("maria", SIGNED + "forged"):
            pytest.fail("a refused caller must not get the file")
    assert [entry.pins for entry in cache._index.values()] == [0]
    await cache.get("joao", gs("v1.wav"))  # maria's entry was evictable
    assert cache.entries == 1 and cache.bytes == 1_000


async def test_a_check_that_cannot_reach_storage_fails_like_a_download_would(tmp_path, objects):
    storage = FakeStorage(objects)
    cache = ReferenceCache(tmp_path, 10_000, storage)
    await cache.get("maria", SIGNED + "aaaa")

    async def unavailable(url):
        raise StorageUnavailableError("access check of https://storage.googleapis.com/voices-bucket/v3.wav failed")

    storage.check_access = unavailable
    with pytest.raises(StorageUnavailableError) as info:
        await cache.get("maria", SIGNED + "bbbb")
    assert info.value.retryable
