"""Engine faults through the real worker (`python -m server` in RunPod's production loop, bench.runpod_fake):
an exception, a NaN row and an out-of-memory error fail only the rows that cause them; a CUDA error makes the
worker answer the jobs it holds (retryable) and exit with code 70 so that RunPod replaces it. Faults are injected
into the real engine by tests/reliability/faulty_worker.py, keyed by the job's seed.

Counts: jobs sent, succeeded, failed with which error, lost (never answered: must be zero).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.runpod_fake import COMPLETED, FAILED, QUEUED, FakeRunPod, WorkerProcess
from tests.reliability.faulty_worker import CUDA, NAN, OOM, RAISE
from tests.reliability.test_worker_lifecycle import RUN_TIMEOUT_S, START_TIMEOUT_S, put_reference, worker_env

FAULTY_WORKER = Path(__file__).with_name("faulty_worker.py")
pytestmark = pytest.mark.slow


def job(ref: str, seed: int, text: str = "Uma frase curta para o lote.") -> dict:
    return {"gen_text": text, "ref_audio_url": ref, "voice_id": "voz", "language": "pt", "seed": seed}


def outcome(fake: FakeRunPod, job_id: str) -> str:
    j = fake.jobs[job_id]
    return j.result["output"]["error_code"] if j.state == FAILED else j.state


async def test_engine_faults_fail_only_their_rows_and_a_cuda_error_exits_70(tmp_path):
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        env = worker_env(fake, tmp_path, MAX_CONCURRENCY="16", MAX_BATCH_SIZE="8", BATCH_WAIT_MS="1500")
        worker = await WorkerProcess([sys.executable, str(FAULTY_WORKER)], env, tmp_path / "worker.log",
                                     cwd=str(Path(__file__).resolve().parents[2])).start()  # fmt: skip
        try:
            ready = await fake.wait_until(lambda: len(fake.take_requests) > 0 or worker.process.returncode is not None,
                                          START_TIMEOUT_S)  # fmt: skip
            assert ready and worker.process.returncode is None, worker.log_text()[-4000:]

            # One batch of 8 rows, three of them faulty.
            seeds = [1, RAISE, 2, NAN, 3, OOM, 4, 5]
            ids = fake.enqueue_many(job(ref, s, f"Frase número {i} para o lote.") for i, s in enumerate(seeds))
            assert await fake.wait_done(ids, RUN_TIMEOUT_S), worker.log_text()[-4000:]
            got = {s: outcome(fake, i) for s, i in zip(seeds, ids, strict=True)}
            assert got == {1: COMPLETED, RAISE: "generation_failed", 2: COMPLETED, NAN: "generation_failed",
                           3: COMPLETED, OOM: COMPLETED, 4: COMPLETED, 5: COMPLETED}  # fmt: skip
            assert "non-finite audio" in fake.jobs[ids[3]].result["error"]
            assert "injected failure" in fake.jobs[ids[1]].result["error"]
            assert all(fake.jobs[i].result["output"].get("retryable") is True for i in (ids[1], ids[3]))
            log = worker.log_text()
            assert re.search(r"batch of [2-8] failed \(ValueError: injected failure\); retrying in halves", log)
            assert re.search(r"batch of [2-8] failed \(OutOfMemoryError", log)
            assert worker.process.returncode is None  # still serving

            # A CUDA error: every job in hand is answered (retryable), then the worker exits with 70.
            fatal = fake.enqueue_many(job(ref, s, f"Depois da falha {s}.") for s in (6, CUDA, 7))
            assert await fake.wait_done(fatal, RUN_TIMEOUT_S), worker.log_text()[-4000:]
            code = await asyncio.wait_for(worker.process.wait(), 60)
            tally = Counter(outcome(fake, i) for i in fatal)
            assert tally["fatal_engine_error"] >= 1 and set(tally) <= {COMPLETED, "fatal_engine_error"}, tally
            assert all(fake.jobs[i].result["output"].get("retryable") is True
                       for i in fatal if fake.jobs[i].state == FAILED)  # fmt: skip
            assert code == 70, worker.log_text()[-3000:]
            assert "exiting (code 70)" in worker.log_text()

            # Nothing lost: every job sent got an answer; one sent after the exit waits for the next worker.
            later = fake.enqueue(job(ref, 8))
            assert fake.jobs[later].state == QUEUED
            sent = ids + fatal
            answered = [i for i in sent if fake.jobs[i].state in (COMPLETED, FAILED)]
            assert len(answered) == len(sent) == 11
        finally:
            await worker.stop(5)
