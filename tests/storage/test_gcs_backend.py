"""GCS backend against the real fake-gcs-server on 127.0.0.1: upload, download, metadata, signed URLs, results,
and the reference cache end to end (single-flight counted at the proxy; a download killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from gcloud.aio.storage import blob as gcloud_blob

from storage import (
    InvalidObjectNameError,
    InvalidRefUrlError,
    RefAudioNotFoundError,
    RefAudioTooLargeError,
    ReferenceCache,
    StorageConfig,
    StorageNotConfiguredError,
    StorageRequestError,
    decode_reference,
    open_storage,
    store_result,
)
from testing.loopback import LoopbackApp

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def gcs(make_config):
    storage = await open_storage(make_config())
    yield storage
    await storage.close()


def _verify_v4_signature(url: str, public_key) -> None:
    """Recompute the V4 string-to-sign from the URL and check the RSA signature with the public key."""
    parts = urlsplit(url)
    canonical_query, _, signature = parts.query.partition("&X-Goog-Signature=")
    params = {k: v[0] for k, v in parse_qs(parts.query).items()}
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    canonical_request = "\n".join([
        "GET", parts.path, canonical_query, f"host:{gcloud_blob.HOST.lower()}\n", "host", "UNSIGNED-PAYLOAD"])
    string_to_sign = "\n".join([
        "GOOG4-RSA-SHA256", params["X-Goog-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    public_key.verify(bytes.fromhex(signature), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


async def test_upload_metadata_download(gcs, bucket, make_audio, tmp_path):
    data = make_audio("WAV", seconds=1.5)
    await gcs.upload(data, "refs/voz joão.wav", "audio/wav")
    info = await gcs.metadata("refs/voz joão.wav")
    assert (info.bucket, info.name, info.size, info.content_type) == (bucket, "refs/voz joão.wav", len(data),
                                                                       "audio/wav")
    dest = tmp_path / "ref.wav"
    assert await gcs.download(f"gs://{bucket}/refs/voz joão.wav", dest) == len(data)
    assert dest.read_bytes() == data


async def test_signed_url_round_trip_over_plain_http(gcs, bucket, service_account):
    await gcs.upload(b"result bytes", "generated/x.wav", "audio/wav")
    url = await gcs.signed_url("generated/x.wav", 3600)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"] and query["X-Goog-Expires"] == ["3600"]
    assert query["X-Goog-Credential"][0].startswith(service_account.email + "/")
    _verify_v4_signature(url, service_account.public_key)
    async with aiohttp.ClientSession() as plain, plain.get(url) as response:  # no credentials at all
        assert response.status == 200 and await response.read() == b"result bytes"


async def test_store_result_names_uploads_and_signs(gcs, bucket, make_audio, emulator):
    data = make_audio("FLAC", seconds=1.0)
    stored = await store_result(gcs, "joao_formal", data, "flac", 120)
    assert stored.object_name.startswith("generated/joao_formal_") and stored.object_name.endswith(".flac")
    assert stored.content_type == "audio/flac" and stored.size == len(data)
    assert (await gcs.metadata(stored.object_name)).content_type == "audio/flac"
    assert parse_qs(urlsplit(stored.url).query)["X-Goog-Expires"] == ["120"]
    async with aiohttp.ClientSession() as plain, plain.get(stored.url) as response:
        assert await response.read() == data
    assert emulator.get_object(bucket, stored.object_name) == data


async def test_default_ttl_is_the_configured_one(make_config):
    async with await open_storage(make_config(SIGNED_URL_TTL_S="86400")) as storage:
        url = await storage.signed_url("generated/any.wav")
    assert parse_qs(urlsplit(url).query)["X-Goog-Expires"] == ["86400"]


async def test_emulator_without_key_gives_a_plain_fetchable_url(make_config, bucket):
    async with await open_storage(make_config(GCS_CREDENTIALS=None)) as storage:
        await storage.upload(b"abc", "generated/plain.wav", "audio/wav")
        url = await storage.signed_url("generated/plain.wav")
        async with aiohttp.ClientSession() as plain, plain.get(url) as response:
            assert await response.read() == b"abc"


async def test_a_signed_reference_url_downloads_and_shares_the_cache_entry(gcs, bucket, make_audio, tmp_path):
    data = make_audio("OGG", seconds=1.5)
    await gcs.upload(data, "refs/maria.ogg", "audio/ogg")
    signed = await gcs.signed_url("refs/maria.ogg", 600)
    cache = ReferenceCache(tmp_path / "cache", 10_000_000, gcs)
    first = await cache.get("maria", signed)
    assert first.path.read_bytes() == data and not first.hit
    assert (await cache.get("maria", f"gs://{bucket}/refs/maria.ogg")).hit
    assert decode_reference(first.path, 22050, 30.0).size > 22050


async def test_missing_object_is_a_clear_not_found(gcs, bucket, tmp_path):
    with pytest.raises(RefAudioNotFoundError, match=f"gs://{bucket}/refs/none.wav"):
        await gcs.download(f"gs://{bucket}/refs/none.wav", tmp_path / "x")
    signed = await gcs.signed_url("refs/none.wav", 600)
    with pytest.raises(RefAudioNotFoundError) as info:
        await gcs.download(signed, tmp_path / "y")
    assert "X-Goog-Signature" not in str(info.value) and "refs/none.wav" in str(info.value)


async def test_byte_cap_is_enforced(gcs, bucket, tmp_path):
    await gcs.upload(b"x" * 5000, "refs/big.wav", "audio/wav")
    with pytest.raises(RefAudioTooLargeError, match="limit"):
        await gcs.download(f"gs://{bucket}/refs/big.wav", tmp_path / "x", max_bytes=4999)
    assert await gcs.download(f"gs://{bucket}/refs/big.wav", tmp_path / "x", max_bytes=5000) == 5000


async def test_refused_urls_cause_no_request(make_config, proxy, tmp_path):
    async with await open_storage(make_config(STORAGE_EMULATOR_HOST=proxy.url)) as storage:
        before = proxy.count()
        cache = ReferenceCache(tmp_path / "cache", 10_000, storage)
        for url in ["http://169.254.169.254/", "file:///etc/passwd", "ftp://x/y.wav",
                    "https://evil.example.com/x.wav", "https://storage.googleapis.com.evil.com/b/x.wav",
                    "gs://not-allowed-bucket/x.wav"]:
            with pytest.raises(InvalidRefUrlError):
                await cache.get("joao", url)
        assert proxy.count() == before and list((tmp_path / "cache").iterdir()) == []


async def test_bad_object_names_are_refused_before_upload(gcs):
    for name in ["../escape.wav", "/abs.wav", "a//b.wav", "a/./b.wav", ""]:
        with pytest.raises(InvalidObjectNameError):
            await gcs.upload(b"x", name, "audio/wav")


async def test_missing_bucket_fails_at_start(make_config):
    with pytest.raises(StorageNotConfiguredError, match="'no-such-bucket-x' .* does not exist"):
        await open_storage(make_config(GCS_BUCKET_NAME="no-such-bucket-x"))


async def test_rejected_credentials_fail_at_start_with_a_reason(service_account, tmp_path):
    """Real-GCS mode: the key is turned down by the token endpoint (a local stand-in answering 400)."""
    seen = []

    async def token(request):
        seen.append(await request.text())
        return web.json_response({"error": "invalid_grant"}, status=400)

    app = web.Application()
    app.router.add_post("/token", token)
    server = await LoopbackApp(app).start()
    port = server.port
    credentials = json.loads(service_account.json) | {"token_uri": f"http://127.0.0.1:{port}/token"}
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": json.dumps(credentials),
                                     "STORAGE_RETRY_DEADLINE_S": "10"})
    try:
        started = time.monotonic()
        with pytest.raises(StorageNotConfiguredError) as info:
            await open_storage(config)
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert "access token (HTTP 400)" in message and service_account.email in message
        assert "PRIVATE KEY" not in message and len(seen) == 1
    finally:
        await server.stop()


async def test_redirects_are_not_followed(make_config, tmp_path):
    hits = []

    async def handler(request):
        hits.append(request.path)
        if request.path.startswith("/voices"):
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        return web.Response(text="should never be fetched")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await LoopbackApp(app).start()
    port = server.port
    try:
        async with await open_storage(make_config(ALLOWED_BUCKETS="voices")) as storage:
            with pytest.raises(StorageRequestError, match="redirect"):
                await storage.download(f"http://127.0.0.1:{port}/voices/a.wav?X-Goog-Signature=s", tmp_path / "x")
        assert hits == ["/voices/a.wav"]
    finally:
        await server.stop()


async def test_cap_holds_without_content_length(make_config, tmp_path):
    """A chunked response (no Content-Length) is cut once it passes the cap, without reading the rest."""
    sent = []

    async def handler(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"z" * 65536)
            sent.append(1)
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await LoopbackApp(app).start()
    port = server.port
    try:
        async with await open_storage(make_config(ALLOWED_BUCKETS="voices")) as storage:
            with pytest.raises(RefAudioTooLargeError):
                await storage.download(f"http://127.0.0.1:{port}/voices/a.wav", tmp_path / "x", max_bytes=100_000)
    finally:
        await server.stop()
    assert len(sent) < 100


async def test_sixteen_concurrent_jobs_cause_one_get(make_config, proxy, bucket, emulator, make_audio, tmp_path):
    data = make_audio("WAV", seconds=2.0)
    emulator.put_object(bucket, "refs/new-voice.wav", data, "audio/wav")
    proxy.latency_s = 0.2  # keep the download in flight while all 16 arrive
    async with await open_storage(make_config(STORAGE_EMULATOR_HOST=proxy.url)) as storage:
        cache = ReferenceCache(tmp_path / "cache", 10_000_000, storage)
        object_path = f"/storage/v1/b/{bucket}/o/refs%2Fnew-voice.wav"
        results = await asyncio.gather(*[cache.get("new-voice", f"gs://{bucket}/refs/new-voice.wav")
                                         for _ in range(16)])
    assert proxy.count("GET", object_path) == 1
    assert all(r.path.read_bytes() == data for r in results)
    assert len({r.sha256 for r in results}) == 1 and cache.downloads == 1


_KILL_SCRIPT = """
import asyncio, json, sys
from storage import ReferenceCache, StorageConfig, open_storage

async def main():
    config = StorageConfig.from_env(json.loads(sys.argv[1]))
    storage = await open_storage(config)
    cache = ReferenceCache(config.cache_dir, config.cache_max_bytes, storage, config.max_ref_bytes)
    await cache.get("killed-voice", sys.argv[2])

asyncio.run(main())
"""


async def test_a_download_killed_with_sigkill_leaves_no_entry(gcs_env, proxy, bucket, emulator, tmp_path):
    data = os.urandom(1024 * 1024)
    emulator.put_object(bucket, "refs/slow.wav", data, "audio/wav")
    proxy.chunk_delay_s = 0.5  # 16 chunks of 64 KiB: about 8 s, far longer than the test waits
    cache_dir = tmp_path / "cache"
    env = dict(gcs_env, STORAGE_EMULATOR_HOST=proxy.url, AUDIO_CACHE_DIR=str(cache_dir))
    url = f"gs://{bucket}/refs/slow.wav"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILL_SCRIPT, json.dumps(env), url, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".part") and p.stat().st_size > 0 for p in _files(cache_dir)):
            assert child.returncode is None, (await child.stderr.read()).decode()[-2000:]
            assert time.monotonic() < deadline, "the download never started"
            await asyncio.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert [p.name.endswith(".part") for p in _files(cache_dir)] == [True]  # the crash left a half file
    proxy.clear()
    async with await open_storage(StorageConfig.from_env(env)) as storage:
        restarted = ReferenceCache(cache_dir, 10_000_000, storage)
        assert restarted.entries == 0 and _files(cache_dir) == []
        fresh = await restarted.get("killed-voice", url)
        assert not fresh.hit and fresh.path.read_bytes() == data


def _files(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []



async def test_the_operators_emulator_host_is_never_refused(make_config, emulator, bucket, tmp_path):
    """Even named `localhost`, without the test flag, and with localhost listed as a caller host: the client's
    own traffic passes, while a caller URL to the same place is refused."""
    port = emulator.port
    config = make_config(STORAGE_EMULATOR_HOST=f"http://localhost:{port}", ALLOW_LOOPBACK_REF_URLS="0",
                         ALLOWED_REF_HOSTS="localhost")
    async with await open_storage(config) as storage:
        await storage.upload(b"abc", "refs/op.wav", "audio/wav")
        assert await storage.download(f"gs://{bucket}/refs/op.wav", tmp_path / "x") == 3
        with pytest.raises(InvalidRefUrlError):
            await storage.download(f"http://localhost:{port}/{bucket}/refs/op.wav", tmp_path / "y")
