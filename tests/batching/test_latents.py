"""The speaker-latent cache: LRU in memory, files on disk, single-flight, failures not cached."""

import asyncio
import os

import pytest
import torch

from batching.engine import VoiceLatents
from batching.latents import LatentCache


def latents(value: float) -> VoiceLatents:
    return VoiceLatents(torch.full((1, 32, 4), value), torch.full((1, 512, 1), value))


class Computer:
    def __init__(self, fail_times=0):
        self.calls = 0
        self.fail_times = fail_times

    async def __call__(self, value=1.0):
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.calls <= self.fail_times:
            raise RuntimeError("reference could not be decoded")
        return latents(value)


async def test_memory_lru_keeps_the_most_recently_used(tmp_path):
    cache = LatentCache(2, None, "m")
    compute = Computer()
    for key in ("a", "b", "a", "c"):  # "a" is used again before "c" arrives, so "b" goes
        await cache.get(key, compute)
    assert compute.calls == 3
    assert (await cache.get("a", compute))[1] is True
    assert (await cache.get("b", compute))[1] is False
    assert len(cache) == 2


async def test_single_flight_and_failures_are_not_cached():
    cache = LatentCache(8, None, "m")
    compute = Computer(fail_times=1)
    results = await asyncio.gather(*(cache.get("v", compute) for _ in range(5)), return_exceptions=True)
    assert compute.calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    value, hit = await cache.get("v", compute)  # the next request tries again
    assert compute.calls == 2 and hit is False
    torch.testing.assert_close(value.gpt_cond_latent, latents(1.0).gpt_cond_latent)


async def test_a_cancelled_caller_does_not_cancel_the_others():
    cache = LatentCache(8, None, "m")
    compute = Computer()
    first = asyncio.create_task(cache.get("v", compute))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get("v", compute))
    await asyncio.sleep(0)
    first.cancel()
    value, hit = await second
    assert compute.calls == 1 and hit is True


async def test_disk_survives_a_restart_and_is_keyed_by_model(tmp_path):
    await LatentCache(8, tmp_path, "model-a").get("voice", lambda: Computer()(2.0))
    restarted = LatentCache(8, tmp_path, "model-a")
    compute = Computer()
    value, hit = await restarted.get("voice", compute)
    assert hit and compute.calls == 0 and restarted.disk_hits == 1
    assert float(value.speaker_embedding.flatten()[0]) == 2.0
    other_model = LatentCache(8, tmp_path, "model-b")
    _, hit = await other_model.get("voice", compute)
    assert not hit and compute.calls == 1


async def test_an_unreadable_file_is_recomputed(tmp_path):
    cache = LatentCache(8, tmp_path, "m")
    (tmp_path / "m-voice.pt").write_bytes(b"truncated")
    compute = Computer()
    _, hit = await cache.get("voice", compute)
    assert not hit and compute.calls == 1
    assert (await LatentCache(8, tmp_path, "m").get("voice", compute))[1] is True


async def test_disk_entries_are_bounded(tmp_path):
    cache = LatentCache(100, tmp_path, "m", disk_max_entries=3)
    for i in range(6):
        await cache.get(f"v{i}", Computer())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["m-v3.pt", "m-v4.pt", "m-v5.pt"]


@pytest.mark.parametrize("key", ["../etc", "a/b", "", "x" * 129, "sp ace"])
async def test_keys_cannot_escape_the_folder(tmp_path, key):
    with pytest.raises(ValueError, match="latent cache key must match"):
        await LatentCache(8, tmp_path, "m").get(key, Computer())


async def test_concurrent_saves_and_loads_with_a_tiny_disk_bound_never_fail_a_job(tmp_path, caplog):
    """Many voices saved and loaded at once from worker threads while each save prunes the folder to 2 files:
    files vanish between listing, stat, load and utime. Every get must still return the latents (a disk error
    is a miss or a skipped save), never raise."""
    writers = [LatentCache(1, tmp_path, "m", disk_max_entries=2) for _ in range(4)]  # workers sharing the folder

    async def job(i: int):
        cache = writers[i % len(writers)]
        value, _ = await cache.get(f"v{i % 90}", lambda: Computer()(float(i % 90)))
        return float(value.speaker_embedding.flatten()[0]) == float(i % 90)

    results = await asyncio.gather(*(job(i) for i in range(360)), return_exceptions=True)
    failures = [r for r in results if r is not True]
    assert failures == []
    assert len(list(tmp_path.glob("*.pt"))) <= 2 + len(writers)  # bounded (a save racing a prune may add one)
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_disk_errors_degrade_to_a_miss_or_a_skipped_save(tmp_path, monkeypatch):
    cache = LatentCache(1, tmp_path, "m", disk_max_entries=1)
    cache._save("a", latents(1.0))
    real_utime, real_stat = os.utime, type(tmp_path).stat

    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "utime", vanished)  # deleted right after it was read
    assert cache._load("a") is not None
    monkeypatch.setattr(os, "utime", real_utime)
    monkeypatch.setattr(type(tmp_path), "stat", lambda self, **kw: vanished())  # pruned while listing
    cache._save("b", latents(2.0))  # no exception
    monkeypatch.setattr(type(tmp_path), "stat", real_stat)
    monkeypatch.setattr(torch, "save", lambda *a, **k: vanished())  # folder removed under us
    cache._save("c", latents(3.0))  # no exception
