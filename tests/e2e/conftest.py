"""End-to-end fixtures: the real `python -m server` in a process of its own, against real local services.

    gcs_bucket      fake-gcs-server (testing.gcs_emulator) with the buckets `seu-bucket` and `meu-bucket` (the seed
                    README's examples use both) and the reference voices uploaded (testing.voices.synthetic_voice)
    fake_runpod     testing.runpod_fake.FakeRunPod: RunPod's job protocol on 127.0.0.1
    gcs_worker      `python -m server` in RunPod's production mode (RUNPOD_WEBHOOK_GET_JOB -> fake_runpod), GCS on
                    the emulator with a throwaway service-account key (so result URLs are V4-signed), the tiny demo
                    checkpoint on CPU; started once per module, ready when the SDK asks for its first jobs; killed
                    (its whole process group) at the end, also when a test or the start fails. It runs the server's
                    main through testing/faulty_worker.py, which leaves every job alone except one whose
                    seed is GATE: that job's batch waits while `gcs_worker.gate_file` exists, so a test can hold the
                    engine busy on cue instead of hoping a batch lasts long enough

Every fixture is module-scoped and lives on the module's event loop: a test module that uses them marks its tests
`pytest.mark.asyncio(loop_scope="module")`. A worker's output goes to a log file; when a test fails, the tail of
every worker log still open is added to the failure report.

Timeouts here are hang guards only (a worker takes ~15-25 s to start on a 2-core machine): no assertion is about
speed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from testing.accounts import ServiceAccount
from testing.e2e_worker import BUCKET, NOT_AUDIO_OBJECT, OTHER_BUCKET, VOICES, E2EWorker, running_worker, worker_env
from testing.gcs_emulator import GcsEmulator
from testing.loopback import free_port
from testing.runpod_fake import FakeRunPod

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gcs_bucket() -> Iterator[GcsEmulator]:
    """fake-gcs-server with both buckets and every voice uploaded, plus a text file named like a WAV."""
    with GcsEmulator(buckets=[BUCKET, OTHER_BUCKET]) as emulator:
        for voice in VOICES:
            emulator.put_object(voice.bucket, voice.object_name, voice.wav_bytes(), "audio/wav")
        emulator.put_object(BUCKET, NOT_AUDIO_OBJECT, b"Isto nao e audio, e um arquivo de texto.\n" * 40, "audio/wav")
        yield emulator


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake_runpod() -> AsyncIterator[FakeRunPod]:
    async with FakeRunPod(poll_timeout_s=0.5, stop_poll_timeout_s=0.5) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gcs_worker(
    fake_runpod: FakeRunPod, gcs_bucket: GcsEmulator, service_account: ServiceAccount, tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[E2EWorker]:  # fmt: skip
    """`python -m server` in RunPod's production mode against fake_runpod, on the GCS emulator, with V4 signing."""
    folder = tmp_path_factory.mktemp("e2e-gcs-worker")
    metrics_port = free_port()
    env = worker_env(
        XTTS_MODEL_DIR=str(tiny_checkpoint),
        XTTS_DEVICE="cpu",
        MAX_CONCURRENCY="16",
        MAX_BATCH_SIZE="8",
        BATCH_WAIT_MS="50",
        METRICS_PORT=str(metrics_port),
        LATENT_CACHE_DIR=str(folder / "latent_cache"),
        AUDIO_CACHE_DIR=str(folder / "audio_cache"),
        STORAGE_BACKEND="gcs",
        STORAGE_EMULATOR_HOST=gcs_bucket.url,
        GCS_BUCKET_NAME=BUCKET,
        GCS_CREDENTIALS=service_account.json,
        ALLOWED_BUCKETS=f"{BUCKET},{OTHER_BUCKET}",
    )
    async with running_worker("gcs-worker", fake_runpod, env, folder, metrics_port=metrics_port,
                              gated=True) as worker:  # fmt: skip
        yield worker
