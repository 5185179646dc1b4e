"""Engine faults through the real worker (`python -m server` in RunPod's production loop, bench.runpod_fake):
an exception, a NaN row and an out-of-memory error fail only the rows that cause them; a CUDA error makes the
worker answer the jobs it holds (retryable) and exit with code 70 so that RunPod replaces it; a job stopped by
RunPod and a job past JOB_TIMEOUT_S leave the queue without reaching the engine. Faults are injected into the real
engine by tests/reliability/faulty_worker.py, keyed by the job's seed.

Counts: jobs sent, succeeded, failed with which error, lost (never answered: must be zero).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.runpod_fake import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED, FakeRunPod, WorkerProcess
from tests.reliability.faulty_worker import CUDA, NAN, OOM, RAISE, SLOW
from tests.reliability.test_worker_lifecycle import RUN_TIMEOUT_S, put_reference, start_worker, worker_env

FAULTY_WORKER = Path(__file__).with_name("faulty_worker.py")
pytestmark = pytest.mark.slow


def test_importing_the_fault_injector_changes_nothing():
    # This module takes the seed values from faulty_worker; only the worker process it starts may be patched.
    from batching.engine import XttsEngine
    from tests.reliability import faulty_worker

    for name, patch in faulty_worker.PATCHES.items():
        assert getattr(XttsEngine, name) is getattr(faulty_worker, f"_real_{name}") is not patch


def job(ref: str, seed: int, text: str = "Uma frase curta para o lote.") -> dict:
    return {"gen_text": text, "ref_audio_url": ref, "voice_id": "voz", "language": "pt", "seed": seed}


def outcome(fake: FakeRunPod, job_id: str) -> str:
    j = fake.jobs[job_id]
    return j.result["output"]["error_code"] if j.state == FAILED else j.state


async def start_faulty_worker(fake: FakeRunPod, tmp: Path, **settings: str) -> WorkerProcess:
    return await start_worker(fake, worker_env(fake, tmp, **settings), tmp / "worker.log",
                              argv=[sys.executable, str(FAULTY_WORKER)])  # fmt: skip


def engine_calls(worker: WorkerProcess) -> list[list[int]]:
    return [json.loads(m) for m in re.findall(r"faulty_worker: generate seeds=(\[[\d, ]*\])", worker.log_text())]


async def test_engine_faults_fail_only_their_rows_and_a_cuda_error_exits_70(tmp_path):
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        worker = await start_faulty_worker(fake, tmp_path, MAX_CONCURRENCY="16", MAX_BATCH_SIZE="8",
                                           BATCH_WAIT_MS="1500")  # fmt: skip
        try:

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


async def test_a_stopped_job_and_a_timed_out_job_never_reach_the_engine(tmp_path):
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        # One row per batch; the SLOW job holds the engine for 14 s, longer than JOB_TIMEOUT_S.
        worker = await start_faulty_worker(fake, tmp_path, MAX_CONCURRENCY="8", MAX_BATCH_SIZE="1",
                                           BATCH_WAIT_MS="0", JOB_TIMEOUT_S="6", FAULTY_SLOW_S="14")  # fmt: skip
        try:
            slow = fake.enqueue(job(ref, SLOW))
            assert await fake.wait_until(lambda: [SLOW] in engine_calls(worker), RUN_TIMEOUT_S), worker.log_text()
            stopped, timed = fake.enqueue(job(ref, 11)), fake.enqueue(job(ref, 12))
            # Both wait in the worker's GPU queue behind the slow job. (A stop that reaches the SDK in the ~0.1 s
            # between its taking a job and starting the job's task is dropped by the SDK: runpod 1.12's stop_job
            # only looks at started tasks. Not this worker's to mend; the README lists it.)
            assert await fake.wait_until(lambda: all(f"[{i}] generating audio" in worker.log_text()
                                                     for i in (stopped, timed)), 30)  # fmt: skip
            assert fake.jobs[stopped].state == fake.jobs[timed].state == IN_PROGRESS
            assert fake.cancel(stopped) == "stopping"  # RunPod's /cancel: the stop goes out on the job-stop channel
            await fake.wait_done([slow, timed], RUN_TIMEOUT_S)
            # Once the engine is free again, a new job runs: the worker kept serving.
            assert await fake.wait_until(lambda: "slow call done" in worker.log_text(), RUN_TIMEOUT_S)
            after = fake.enqueue(job(ref, 13))
            await fake.wait_done([after], RUN_TIMEOUT_S)

            assert [outcome(fake, i) for i in (slow, stopped, timed, after)] == [
                "job_timeout", CANCELLED, "job_timeout", COMPLETED]
            assert fake.jobs[stopped].stop_sent
            assert "JOB_TIMEOUT_S=6" in fake.jobs[timed].result["error"]
            calls = [c for c in engine_calls(worker) if c != [0]]  # [0]: the warm-up at start
            assert calls == [[SLOW], [13]], calls  # the stopped and the timed-out jobs never reached the engine
            assert f"[{stopped}] job stopped by RunPod" in worker.log_text()
        finally:
            await worker.stop(5)
