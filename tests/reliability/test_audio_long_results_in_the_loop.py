"""Long results through the real worker (`python -m server` in RunPod's production loop, testing.runpod_fake; GCS on
fake-gcs-server): 300 s results in OGG, MP3 and FLAC complete, the uploaded objects decode to 300 s, and the worker
is still alive and serves the next job. A silent reference (issue #16) fails that job alone, clearly.

Before storage.audio encoded in blocks, an OGG result longer than ~87 s killed the worker (SIGSEGV, exit 139) in
libvorbis (libsndfile #1095) and every job it held was lost. The engine is replaced, in the worker process only, by
testing/long_audio_worker.py, which returns 300 s of audio per segment without running the model.
"""

from __future__ import annotations

import asyncio
import io
import sys
import uuid

import numpy as np
import pytest
import soundfile as sf

from testing.runpod_fake import COMPLETED, FAILED, TERMINAL_STATES, FakeRunPod, WorkerProcess
from testing.runpod_worker import RUN_TIMEOUT_S, start_worker, worker_env
from testing.voices import ROOT, synthetic_voice

LONG_AUDIO_WORKER = ROOT / "testing" / "long_audio_worker.py"
LONG_S = 300.0
pytestmark = pytest.mark.slow


def test_importing_the_long_audio_worker_changes_nothing():
    from batching.engine import XttsEngine
    from testing import long_audio_worker

    assert XttsEngine.vocode is long_audio_worker._real_vocode is not long_audio_worker.vocode


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 22050, format="WAV")
    return buf.getvalue()


def _job(bucket: str, fmt: str, ref: str = "long") -> dict:
    return {"gen_text": "Uma frase curta.", "ref_audio_url": f"gs://{bucket}/refs/{ref}.wav", "voice_id": ref,
            "language": "pt", "seed": 1, "output_format": fmt}  # fmt: skip


async def _wait_done_or_dead(fake: FakeRunPod, worker: WorkerProcess, ids: list[str], timeout_s: float) -> None:
    """Wait for the jobs; fail at once, with the exit code, if the worker dies (a segfault is exit -11/139)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(fake.jobs[i].state in TERMINAL_STATES for i in ids):
        if worker.process.returncode is not None:
            pytest.fail(f"the worker died (exit {worker.process.returncode}) with jobs in hand; "
                        f"states {[fake.jobs[i].state for i in ids]}:\n{worker.log_text()[-3000:]}")  # fmt: skip
        if loop.time() > deadline:
            pytest.fail(f"jobs unfinished after {timeout_s} s:\n{worker.log_text()[-3000:]}")
        await asyncio.sleep(0.2)


def _peak_hz(wav: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.fft.rfftfreq(wav.size, 1 / sample_rate)[spectrum.argmax()])


async def test_300_second_results_complete_in_every_format_and_the_worker_lives_on(tmp_path, emulator,
                                                                                   service_account):  # fmt: skip
    bucket = f"long-{uuid.uuid4().hex[:8]}"  # the emulator is shared by the session's tests
    emulator.create_bucket(bucket)
    emulator.put_object(bucket, "refs/long.wav", _wav(synthetic_voice(3.0, f0=150.0)), "audio/wav")
    emulator.put_object(bucket, "refs/mute.wav", _wav(np.zeros(3 * 22050, dtype=np.float32)), "audio/wav")
    async with FakeRunPod() as fake:
        env = worker_env(fake, tmp_path, STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=emulator.url,
                         GCS_CREDENTIALS=service_account.json, GCS_BUCKET_NAME=bucket, MAX_CONCURRENCY="8",
                         MAX_BATCH_SIZE="4", BATCH_WAIT_MS="50", LONG_AUDIO_S=str(LONG_S))  # fmt: skip
        worker = await start_worker(fake, env, tmp_path / "worker.log",
                                    argv=[sys.executable, str(LONG_AUDIO_WORKER)])  # fmt: skip
        try:
            formats = ["ogg", "mp3", "flac"]
            ids = fake.enqueue_many(_job(bucket, fmt) for fmt in formats)
            await _wait_done_or_dead(fake, worker, ids, RUN_TIMEOUT_S)
            states = {fmt: fake.jobs[i].state for fmt, i in zip(formats, ids, strict=True)}
            assert states == dict.fromkeys(formats, COMPLETED), (states, worker.log_text()[-4000:])
            assert worker.process.returncode is None, worker.log_text()[-4000:]  # no segfault in the encoder

            for fmt, job_id in zip(formats, ids, strict=True):
                output = fake.jobs[job_id].output
                assert output["output_format"] == fmt and abs(output["duration"] - LONG_S) < 0.5
                data = emulator.get_object(bucket, output["object_name"])
                wav, rate = sf.read(io.BytesIO(data), dtype="float32")
                assert rate == 24000 and wav.ndim == 1
                assert abs(wav.size / rate - LONG_S) < 0.5, (fmt, wav.size / rate)  # MP3 adds encoder padding
                tail = wav[-5 * rate:]  # the end of the signal was written too, not just its first blocks
                assert abs(_peak_hz(tail, rate) - 220.0) < 2.0 and np.sqrt(np.mean(tail**2)) > 0.1, fmt

            # Still alive, and it serves the next jobs: one with a silent reference fails alone, clearly.
            mute, after = fake.enqueue(_job(bucket, "ogg", "mute")), fake.enqueue(_job(bucket, "ogg"))
            await _wait_done_or_dead(fake, worker, [mute, after], RUN_TIMEOUT_S)
            assert fake.jobs[after].state == COMPLETED, fake.jobs[after].result
            refused = fake.jobs[mute].result
            assert fake.jobs[mute].state == FAILED and refused["output"]["error_code"] == "invalid_audio", refused
            assert "silent" in refused["error"] and "peak -inf dBFS" in refused["error"], refused
            assert not refused["output"].get("retryable"), refused  # the caller must send another reference
            assert worker.process.returncode is None
            assert worker.log_text().count("long_audio_worker: vocode") >= 2  # the warm-up and the jobs
        finally:
            code = await worker.stop(30)
        assert code == 0, worker.log_text()[-3000:]
