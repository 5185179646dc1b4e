"""The local-folder backend: the default with no bucket; same interface, file:// results, no escapes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from storage import (
    InvalidObjectNameError,
    InvalidRefUrlError,
    RefAudioNotFoundError,
    RefAudioTooLargeError,
    ReferenceCache,
    StorageConfig,
    StorageNotConfiguredError,
    decode_reference,
    open_storage,
    store_result,
)
from storage.local import LocalStorage


@pytest.fixture
async def local(tmp_path):
    config = StorageConfig.from_env({"LOCAL_STORAGE_DIR": str(tmp_path / "store")})
    storage = await open_storage(config)
    yield storage
    await storage.close()


def _file_of(url: str) -> Path:
    assert url.startswith("file://")
    return Path(unquote(urlsplit(url).path))


async def test_no_bucket_means_local(local, tmp_path):
    assert isinstance(local, LocalStorage)
    assert local.bucket == "local" and (tmp_path / "store" / "local").is_dir()


async def test_upload_metadata_download(local, tmp_path, make_audio):
    data = make_audio("MP3", seconds=1.5)
    await local.upload(data, "refs/voz joão.mp3", "audio/mpeg")
    assert (tmp_path / "store" / "local" / "refs" / "voz joão.mp3").read_bytes() == data
    info = await local.metadata("refs/voz joão.mp3")
    assert (info.size, info.content_type) == (len(data), "audio/mpeg")
    assert await local.download("gs://local/refs/voz joão.mp3", tmp_path / "copy") == len(data)
    assert (tmp_path / "copy").read_bytes() == data


async def test_store_result_returns_a_file_url(local, make_audio):
    data = make_audio("WAV", seconds=1.0)
    stored = await store_result(local, "joao_formal", data, "wav")
    assert re.fullmatch(r"generated/joao_formal_\d{8}_\d{6}_[0-9a-f]{8}\.wav", stored.object_name)
    assert _file_of(stored.url).read_bytes() == data
    assert [p.name for p in _file_of(stored.url).parent.iterdir()] == [Path(stored.object_name).name]  # no temp


async def test_reference_cache_on_the_local_backend(local, tmp_path, make_audio):
    data = make_audio("FLAC", seconds=2.0)
    await local.upload(data, "refs/a.flac", "audio/flac")
    cache = ReferenceCache(tmp_path / "cache", 1_000_000, local)
    ref = await cache.get("a-voice", "gs://local/refs/a.flac")
    assert ref.path.read_bytes() == data and (await cache.get("a-voice", "gs://local/refs/a.flac")).hit
    assert decode_reference(ref.path, 22050, 30.0).size == 2 * 22050


async def test_missing_and_too_large(local, tmp_path):
    with pytest.raises(RefAudioNotFoundError, match="gs://local/refs/none.wav"):
        await local.download("gs://local/refs/none.wav", tmp_path / "x")
    await local.upload(b"y" * 2000, "refs/big.wav", "audio/wav")
    with pytest.raises(RefAudioTooLargeError):
        await local.download("gs://local/refs/big.wav", tmp_path / "x", max_bytes=1000)


async def test_other_buckets_and_escapes_are_refused(local, tmp_path):
    secret = tmp_path / "store" / "secret.wav"
    secret.write_bytes(b"not yours")
    for url in ["gs://other/x.wav", "gs://local/../secret.wav", "file:///etc/passwd"]:
        with pytest.raises(InvalidRefUrlError):
            await local.download(url, tmp_path / "x")
    for name in ["../secret.wav", "a/../../secret.wav", "/etc/passwd"]:
        with pytest.raises(InvalidObjectNameError):
            await local.upload(b"x", name, "audio/wav")


async def test_symlinks_cannot_lead_out_of_the_bucket(local, tmp_path):
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"private")
    os.symlink(outside, tmp_path / "store" / "local" / "link.wav")
    with pytest.raises(InvalidObjectNameError, match="leaves the bucket"):
        await local.download("gs://local/link.wav", tmp_path / "x")


async def test_unusable_folder_fails_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageNotConfiguredError, match="LOCAL_STORAGE_DIR"):
        await open_storage(StorageConfig.from_env({"LOCAL_STORAGE_DIR": str(blocker)}))


async def test_https_references_still_need_an_allowed_host(local, tmp_path):
    with pytest.raises(InvalidRefUrlError):
        await local.download("https://evil.example.com/local/x.wav", tmp_path / "x")
