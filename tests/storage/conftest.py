"""Shared fixtures for storage tests: a real fake-gcs-server on 127.0.0.1, a fault proxy in front of it, a
throwaway service-account key, config builders and audio samples.

The emulator is started once per session (it starts in well under a second); every test gets its own bucket.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from storage import StorageConfig
from testing.faultproxy import FaultProxy
from testing.gcs_emulator import GcsEmulator


@dataclass(frozen=True)
class ServiceAccount:
    json: str
    email: str
    public_key: rsa.RSAPublicKey


@pytest.fixture(scope="session")
def service_account() -> ServiceAccount:
    """A fake service account with a freshly generated RSA key. Its token_uri is a closed local port: nothing
    may ever try to reach Google with it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    email = "tester@fake-project.iam.gserviceaccount.com"
    data = {
        "type": "service_account", "project_id": "fake-project", "private_key_id": uuid.uuid4().hex,
        "private_key": pem, "client_email": email, "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",
    }
    return ServiceAccount(json.dumps(data), email, key.public_key())


@pytest.fixture(scope="session")
def emulator() -> Iterator[GcsEmulator]:
    with GcsEmulator() as emu:
        yield emu


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


def tone(seconds: float, sample_rate: int = 24000, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def audio_bytes(fmt: str = "WAV", seconds: float = 2.0, sample_rate: int = 24000, channels: int = 1) -> bytes:
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, sample_rate, channels), sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture
def make_audio() -> Callable[..., bytes]:
    """`make_audio(fmt="WAV", seconds=2.0, sample_rate=24000, channels=1)` -> encoded bytes of a tone."""
    return audio_bytes
