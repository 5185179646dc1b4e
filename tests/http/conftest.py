"""Fixtures for SERVER_MODE=http: the real `python -m server` in a process of its own, on loopback, with the tiny demo
checkpoint on CPU and the GCS emulator (testing.gcs_emulator) as its storage.

    http_bucket     fake-gcs-server with the bucket `seu-bucket` and two reference voices under referencias/
    http_worker     `python -m server` with SERVER_MODE=http against it: API_KEY set, VOICE_REF_URL_TEMPLATE
                    gs://seu-bucket/referencias/{voice}.wav, MAX_CONCURRENCY 24, MAX_BATCH_SIZE 8; ready when
                    GET /ping answers 200; SIGTERM at the end (its whole process group), which must exit 0

A worker's log goes to a file; the tail of every worker log still open is added to a failing test's report.
Timeouts are hang guards only (a worker takes ~15-25 s to start on a 2-core machine): no assertion is about speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testing.accounts import ServiceAccount
from testing.e2e_worker import tail
from testing.gcs_emulator import GcsEmulator
from testing.http_worker import (
    API_KEY,
    BUCKET,
    TEMPLATE,
    VOICES,
    HttpWorker,
    http_env,
    start_http_worker,
    stop_http_worker,
)
from testing.loopback import free_port
from testing.voices import synthetic_voice_wav


@pytest.fixture(scope="module")
def http_bucket() -> Iterator[GcsEmulator]:
    with GcsEmulator(buckets=[BUCKET]) as emulator:
        for seed, (voice, f0) in enumerate(VOICES.items()):
            wav = synthetic_voice_wav(4.0, sr=22050, f0=f0, seed=seed)
            emulator.put_object(BUCKET, f"referencias/{voice}.wav", wav, "audio/wav")
        yield emulator


@pytest.fixture(scope="module")
def http_worker(
    http_bucket: GcsEmulator, service_account: ServiceAccount, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HttpWorker]:  # fmt: skip
    folder = tmp_path_factory.mktemp("http-worker")
    env = http_env(
        folder, free_port(), free_port(), API_KEY=API_KEY, VOICE_REF_URL_TEMPLATE=TEMPLATE, MAX_CONCURRENCY="24",
        MAX_BATCH_SIZE="8", BATCH_WAIT_MS="50", STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=http_bucket.url,
        GCS_BUCKET_NAME=BUCKET, GCS_CREDENTIALS=service_account.json, ALLOWED_BUCKETS=BUCKET,
    )  # fmt: skip
    worker = start_http_worker("http-worker", env, folder / "worker.log")
    yield worker
    status = stop_http_worker(worker)
    assert status == 0, f"the HTTP worker exited with {status} on SIGTERM:\n{tail(worker.server.log_path)}"
