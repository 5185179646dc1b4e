"""xtts_storage_retries_total / xtts_storage_errors_total move under injected GCS faults: the real GCS backend
behind the fault proxy (testing.faultproxy), in front of fake-gcs-server, feeding the worker's own metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics, StorageMetrics
from storage import RefAudioNotFoundError, StorageUnavailableError, open_storage

PAYLOAD = bytes(range(256)) * 256


def counts(metrics: Metrics) -> dict[tuple[str, str], float]:
    """{(counter, reason): value} for every storage sample with a value."""
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in ("xtts_storage_retries_total", "xtts_storage_errors_total") and sample.value:
                found[(sample.name.removeprefix("xtts_storage_").removesuffix("_total"),
                       sample.labels["reason"])] = sample.value
    return found


@pytest.fixture
async def observed(make_config, proxy, bucket, emulator):
    emulator.put_object(bucket, "refs/voice.wav", PAYLOAD, "audio/wav")
    metrics = Metrics(CollectorRegistry())
    config = make_config(STORAGE_EMULATOR_HOST=proxy.url, STORAGE_TIMEOUT_S="0.5", STORAGE_MAX_RETRIES="3",
                         STORAGE_RETRY_DEADLINE_S="4")
    storage = await open_storage(config)
    storage.observer = StorageMetrics(metrics)
    yield storage, proxy, metrics, f"gs://{bucket}/refs/voice.wav"
    await storage.close()


async def test_each_retry_is_counted_by_its_reason(observed, tmp_path):
    storage, proxy, metrics, url = observed
    proxy.fail_next(2, 503, path_contains="/o/refs")
    proxy.fail_next(1, 429, path_contains="/o/refs")
    assert await storage.download(url, tmp_path / "a") == len(PAYLOAD)
    proxy.reset_next(3, path_contains="/o/refs")  # aiohttp retries one reset keep-alive itself
    assert await storage.download(url, tmp_path / "b") == len(PAYLOAD)
    proxy.delay_next(1, 2.0, path_contains="/o/refs")  # longer than STORAGE_TIMEOUT_S=0.5
    assert await storage.download(url, tmp_path / "c") == len(PAYLOAD)
    found = counts(metrics)
    assert found[("retries", "5xx")] == 2 and found[("retries", "429")] == 1
    assert found[("retries", "timeout")] == 1
    assert found[("retries", "connection")] >= 1
    assert not any(kind == "errors" for kind, _ in found)  # every download succeeded in the end


async def test_final_failures_are_counted_by_their_code(observed, tmp_path):
    storage, proxy, metrics, url = observed
    with pytest.raises(RefAudioNotFoundError):
        await storage.download(url.replace("voice", "missing"), tmp_path / "x")
    proxy.persistent_status = 503
    with pytest.raises(StorageUnavailableError):
        await storage.download(url, tmp_path / "y")
    with pytest.raises(StorageUnavailableError):
        await storage.upload(b"x", "generated/x.wav", "audio/wav")
    found = counts(metrics)
    assert found[("errors", "ref_audio_not_found")] == 1
    assert found[("errors", "storage_unavailable")] == 2
    assert found[("retries", "5xx")] == 6  # 3 retries of each operation before giving up
