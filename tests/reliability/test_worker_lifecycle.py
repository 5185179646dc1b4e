"""Reliability of the real worker process (`python -m server`) in RunPod's production loop (testing.runpod_fake):
graceful shutdown with jobs in flight, a result POST that RunPod refuses, secrets kept out of everything written.

Each test counts what it sent, what succeeded, what failed with which error, and what was lost (must be zero).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from testing.runpod_fake import COMPLETED, IN_PROGRESS, QUEUED, FakeRunPod
from testing.runpod_worker import RUN_TIMEOUT_S, job, put_reference, start_worker, worker_env
from testing.voices import synthetic_voice_wav

pytestmark = pytest.mark.slow


async def test_sigterm_finishes_jobs_in_flight_then_exits_0(tmp_path):
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "a.wav")
        worker = await start_worker(fake, worker_env(fake, tmp_path, MAX_CONCURRENCY="6", MAX_BATCH_SIZE="3",
                                                     BATCH_WAIT_MS="50"), tmp_path / "worker.log")  # fmt: skip
        try:
            ids = fake.enqueue_many(job(ref, "voz_a", f"Frase número {i}, para o teste.") for i in range(10))
            assert await fake.wait_until(lambda: len(fake.in_progress()) >= 6, RUN_TIMEOUT_S), worker.log_text()[-3000:]
            taken = set(fake.in_progress())
            code = await worker.stop(timeout_s=RUN_TIMEOUT_S)  # SIGTERM, as RunPod sends it
        finally:
            await worker.stop(5)
        log = worker.log_text()
        states = {i: fake.jobs[i].state for i in ids}
        completed = [i for i in ids if states[i] == COMPLETED]
        lost = [i for i in ids if states[i] == IN_PROGRESS]  # taken by the worker, never answered
        print(f"sent 10, taken before SIGTERM {len(taken)}, completed {len(completed)}, "
              f"left queued {sum(s == QUEUED for s in states.values())}, lost {len(lost)}")  # fmt: skip
        assert code == 0, log[-3000:]
        assert lost == [], log[-3000:]
        assert taken <= set(completed)  # every job in flight at SIGTERM finished, upload included
        for i in completed:
            out = fake.jobs[i].output
            assert Path(out["audio_url"].removeprefix("file://")).is_file()


async def test_a_refused_result_post_is_logged_with_the_job_and_the_object(tmp_path):
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "b.wav")
        worker = await start_worker(fake, worker_env(fake, tmp_path), tmp_path / "worker.log")
        try:
            doomed = fake.enqueue(job(ref, "voz_b"), job_id="job-post-fails")
            fake.fail_result_posts(3, status=503, job_id=doomed)  # the SDK tries 3 times, then drops the result
            fine = fake.enqueue(job(ref, "voz_b", "Outra frase."))
            await fake.wait_done([fine], RUN_TIMEOUT_S)
            await fake.wait_until(lambda: "job-post-fails" in worker.log_text() and "upload done" in worker.log_text(),
                                  30)  # fmt: skip
        finally:
            await worker.stop(RUN_TIMEOUT_S)
        log = worker.log_text()
        assert fake.jobs[fine].state == COMPLETED
        assert fake.jobs[doomed].state == IN_PROGRESS  # RunPod never got it: what the SDK does after 3 refusals
        # ... but the audio is not lost: the worker's log names the job and the object in the bucket.
        line = next(ln for ln in log.splitlines() if "[job-post-fails] upload done: generated/voz_b_" in ln)
        object_name = line.split("upload done: ")[1].split(" ")[0]
        assert (tmp_path / "objects" / "voices" / object_name).is_file()


async def test_secrets_never_reach_logs_outputs_or_metrics(tmp_path, service_account, emulator):
    """A recognisable fake key is planted in GCS_CREDENTIALS, and a caller sends a reference URL with a
    signature: nothing the worker writes (log at DEBUG, job outputs and errors, metrics) may contain either."""
    planted = json.loads(service_account.json)
    planted["client_id"] = "PLANTED-SECRET-MARKER"
    key_lines = planted["private_key"].strip().splitlines()[1:-1]
    needles = [key_lines[0], key_lines[len(key_lines) // 2], key_lines[-2], planted["private_key_id"],
               "PLANTED-SECRET-MARKER"]  # fmt: skip
    signature = "deadbeefcafebabe0123456789abcdef"
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"  # the emulator is shared by the session's tests
    emulator.create_bucket(bucket)
    emulator.put_object(bucket, "refs/c.wav", _wav_bytes(), "audio/wav")
    gcs_emulator = emulator
    async with FakeRunPod() as fake:
        from testing.loopback import free_port

        port = free_port()
        env = worker_env(fake, tmp_path, STORAGE_BACKEND="gcs", STORAGE_EMULATOR_HOST=gcs_emulator.url,
                         GCS_CREDENTIALS=json.dumps(planted), LOG_LEVEL="DEBUG", METRICS_PORT=str(port),
                         ALLOW_LOOPBACK_REF_URLS="1", ALLOWED_REF_HOSTS="127.0.0.1",
                         GCS_BUCKET_NAME=bucket)  # fmt: skip
        worker = await start_worker(fake, env, tmp_path / "worker.log")
        try:
            signed_ref = f"{gcs_emulator.url}/{bucket}/refs/c.wav?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature={signature}"
            ids = [
                fake.enqueue(job(f"gs://{bucket}/refs/c.wav", "voz_c")),
                fake.enqueue(job(signed_ref.replace("refs/c.wav", "refs/missing.wav"), "voz_d")),  # a 404
                fake.enqueue({"gen_text": 3, "voice_id": "x", "ref_audio_url": signed_ref}),  # a bad input
            ]
            await fake.wait_done(ids, RUN_TIMEOUT_S)
            import urllib.request

            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        finally:
            await worker.stop(RUN_TIMEOUT_S)
        outputs = json.dumps([fake.jobs[i].result for i in ids])
        written = {"log": worker.log_text(), "outputs": outputs, "metrics": metrics}
        assert fake.jobs[ids[0]].state == COMPLETED, written["log"][-3000:]
        assert "ref_audio_not_found" in outputs and "invalid_type" in outputs, outputs  # the failures did happen
        for where, text in written.items():
            for needle in needles + [signature]:
                assert needle not in text, f"{needle[:12]}... found in {where}"


def _wav_bytes() -> bytes:
    return synthetic_voice_wav(3.0, f0=180.0)
