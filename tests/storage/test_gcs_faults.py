"""Fault injection between the GCS backend and the emulator (testing.faultproxy): what is retried, what is not,
and that every failure is bounded in time and named clearly."""

from __future__ import annotations

import time

import pytest

from storage import (
    RefAudioForbiddenError,
    RefAudioNotFoundError,
    StorageRequestError,
    StorageUnavailableError,
    open_storage,
)

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB: several proxy chunks


@pytest.fixture
async def setup(make_config, proxy, bucket, emulator):
    emulator.put_object(bucket, "refs/voice.wav", PAYLOAD, "audio/wav")
    storage = await open_storage(make_config(STORAGE_EMULATOR_HOST=proxy.url))
    yield storage, proxy, f"gs://{bucket}/refs/voice.wav", f"/storage/v1/b/{bucket}/o/refs%2Fvoice.wav"
    await storage.close()


async def test_503s_are_retried(setup, tmp_path):
    storage, proxy, url, path = setup
    proxy.fail_next(3, 503, path_contains="/o/refs")
    assert await storage.download(url, tmp_path / "x") == len(PAYLOAD)
    assert (tmp_path / "x").read_bytes() == PAYLOAD
    assert [status for _, p, status in proxy.log if p == path] == [503, 503, 503, 200]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
async def test_other_transient_statuses_are_retried(setup, tmp_path, status):
    storage, proxy, url, path = setup
    proxy.fail_next(1, status, path_contains="/o/refs")
    assert await storage.download(url, tmp_path / "x") == len(PAYLOAD)
    assert proxy.count("GET", path) == 2


async def test_connection_resets_are_retried(setup, tmp_path):
    storage, proxy, url, path = setup
    proxy.reset_next(3, path_contains="/o/refs")  # aiohttp itself retries a reset keep-alive connection once
    assert await storage.download(url, tmp_path / "x") == len(PAYLOAD)
    assert [status for _, p, status in proxy.log if p == path] == ["reset", "reset", "reset", 200]


async def test_a_reset_mid_body_restarts_the_file_cleanly(setup, tmp_path):
    storage, proxy, url, path = setup
    proxy.reset_next(2, after_bytes=100_000, path_contains="/o/refs")
    assert await storage.download(url, tmp_path / "x") == len(PAYLOAD)
    assert (tmp_path / "x").read_bytes() == PAYLOAD  # no bytes of the broken attempts survive


async def test_a_stalled_response_times_out_and_is_retried(make_config, proxy, bucket, emulator, tmp_path):
    emulator.put_object(bucket, "refs/voice.wav", PAYLOAD, "audio/wav")
    async with await open_storage(make_config(STORAGE_EMULATOR_HOST=proxy.url, STORAGE_TIMEOUT_S="0.5")) as storage:
        proxy.delay_next(1, 3.0, path_contains="/o/refs")
        started = time.monotonic()
        assert await storage.download(f"gs://{bucket}/refs/voice.wav", tmp_path / "x") == len(PAYLOAD)
        assert time.monotonic() - started < 3.0  # did not wait out the stall


async def test_latency_is_tolerated(setup, tmp_path):
    storage, proxy, url, _ = setup
    proxy.latency_s = 0.3
    proxy.chunk_delay_s = 0.02
    assert await storage.download(url, tmp_path / "x") == len(PAYLOAD)


async def test_signed_url_downloads_are_retried_too(setup, tmp_path):
    storage, proxy, _, _ = setup
    signed = await storage.signed_url("refs/voice.wav", 600)
    assert signed.startswith(proxy.url)
    proxy.fail_next(2, 503, path_contains="/refs/voice.wav")
    proxy.reset_next(1, after_bytes=5000, path_contains="/refs/voice.wav")
    assert await storage.download(signed, tmp_path / "x") == len(PAYLOAD)
    assert (tmp_path / "x").read_bytes() == PAYLOAD


async def test_persistent_500_ends_in_a_clear_error_within_a_bounded_time(make_config, proxy, bucket, emulator,
                                                                          tmp_path):
    emulator.put_object(bucket, "refs/voice.wav", PAYLOAD, "audio/wav")
    config = make_config(STORAGE_EMULATOR_HOST=proxy.url, STORAGE_MAX_RETRIES="4", STORAGE_RETRY_DEADLINE_S="5")
    async with await open_storage(config) as storage:
        proxy.persistent_status = 500
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as info:
            await storage.download(f"gs://{bucket}/refs/voice.wav", tmp_path / "x")
        assert time.monotonic() - started < 5.5
    message = str(info.value)
    assert f"gs://{bucket}/refs/voice.wav" in message and "HTTP 500" in message and "5 attempts" in message
    assert info.value.retryable and info.value.error_code == "storage_unavailable"
    assert proxy.count("GET", f"/storage/v1/b/{bucket}/o/refs%2Fvoice.wav") == 5


async def test_persistent_fault_is_cut_by_the_deadline(make_config, proxy, bucket, tmp_path):
    config = make_config(STORAGE_EMULATOR_HOST=proxy.url, STORAGE_MAX_RETRIES="100", STORAGE_RETRY_DEADLINE_S="1.5")
    async with await open_storage(config) as storage:
        proxy.persistent_status = 503
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            await storage.download(f"gs://{bucket}/refs/voice.wav", tmp_path / "x")
        assert time.monotonic() - started < 3.0


async def test_404_fails_at_once(setup, tmp_path):
    storage, proxy, url, _ = setup
    missing = url.replace("voice.wav", "missing.wav")
    started = time.monotonic()
    with pytest.raises(RefAudioNotFoundError, match="refs/missing.wav"):
        await storage.download(missing, tmp_path / "x")
    assert time.monotonic() - started < 1.0
    assert proxy.count("GET", contains="missing.wav") == 1


@pytest.mark.parametrize(("status", "error"), [(403, RefAudioForbiddenError), (401, RefAudioForbiddenError),
                                               (400, StorageRequestError)])
async def test_other_4xx_are_not_retried(setup, tmp_path, status, error):
    storage, proxy, url, path = setup
    proxy.fail_next(5, status, path_contains="/o/refs")
    with pytest.raises(error, match="refs/voice.wav"):
        await storage.download(url, tmp_path / "x")
    assert proxy.count("GET", path) == 1


async def test_uploads_are_retried(setup, emulator, bucket):
    storage, proxy, _, _ = setup
    proxy.fail_next(2, 503, method="POST", path_contains="/upload/")
    proxy.reset_next(1, method="POST", path_contains="/upload/")
    await storage.upload(b"generated audio", "generated/retried.wav", "audio/wav")
    assert emulator.get_object(bucket, "generated/retried.wav") == b"generated audio"
    assert proxy.pending_faults == 0


async def test_upload_gives_up_with_a_clear_error(make_config, proxy, bucket):
    config = make_config(STORAGE_EMULATOR_HOST=proxy.url, STORAGE_MAX_RETRIES="2")
    async with await open_storage(config) as storage:
        proxy.persistent_status = 503
        with pytest.raises(StorageUnavailableError, match=f"upload of gs://{bucket}/generated/x.wav"):
            await storage.upload(b"x", "generated/x.wav", "audio/wav")
