"""Fixtures for storage tests: a bucket of their own on the session's fake-gcs-server (tests/conftest.py), a fault
proxy in front of it, config builders and audio samples."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from storage import StorageConfig
from testing.accounts import ServiceAccount
from testing.faultproxy import FaultProxy
from testing.gcs_emulator import GcsEmulator
from testing.sounds import audio_bytes


@pytest.fixture
def bucket(emulator: GcsEmulator) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    emulator.create_bucket(name)
    return name


@pytest.fixture
async def proxy(emulator: GcsEmulator) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(emulator.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def gcs_env(bucket: str, emulator: GcsEmulator, service_account: ServiceAccount, tmp_path) -> dict[str, str]:
    """Environment for a GCS backend on the emulator, with fast retries. Tests edit a copy."""
    return {
        "GCS_BUCKET_NAME": bucket,
        "STORAGE_EMULATOR_HOST": emulator.url,
        "GCS_CREDENTIALS": service_account.json,
        "ALLOW_LOOPBACK_REF_URLS": "1",
        "ALLOWED_REF_HOSTS": "127.0.0.1",
        "AUDIO_CACHE_DIR": str(tmp_path / "cache"),
        "STORAGE_TIMEOUT_S": "5",
        "STORAGE_RETRY_DEADLINE_S": "20",
        "STORAGE_MAX_RETRIES": "5",
        "STORAGE_RETRY_BASE_S": "0.01",
        "STORAGE_RETRY_MAX_BACKOFF_S": "0.05",
    }


@pytest.fixture
def make_config(gcs_env: dict[str, str]) -> Callable[..., StorageConfig]:
    def build(**overrides: str | None) -> StorageConfig:
        env = dict(gcs_env)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return StorageConfig.from_env(env)

    return build


@pytest.fixture
def make_audio() -> Callable[..., bytes]:
    """`make_audio(fmt="WAV", seconds=2.0, sample_rate=24000, channels=1)` -> encoded bytes of a tone."""
    return audio_bytes
