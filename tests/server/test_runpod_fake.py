"""The loopback RunPod service (testing.runpod_fake) against the REAL runpod SDK loop in a separate process.

The worker process (tests/server/sdk_worker.py) runs `runpod.serverless.start` on the production path (JobScaler)
because RUNPOD_WEBHOOK_GET_JOB is set; it has a trivial async handler and no model.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from testing.runpod_fake import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, FakeRunPod, WorkerProcess

REPO = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("sdk_worker.py")
# Generous bounds for a slow 2-core machine: they only decide when a broken run gives up, never what passes.
RUN_TIMEOUT_S = 120


def _worker_env(fake: FakeRunPod, marker_dir: Path, concurrency: int, handler: str = "async") -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    return {
        **base,
        **fake.env(),
        "RUNPOD_LOG_LEVEL": "INFO",
        "FAKE_WORKER_CONCURRENCY": str(concurrency),
        "FAKE_WORKER_HANDLER": handler,
        "FAKE_WORKER_MARKER_DIR": str(marker_dir),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
async def fake():
    async with FakeRunPod(poll_timeout_s=0.5, stop_poll_timeout_s=0.5) as service:
        yield service


@pytest.fixture
async def start_worker(fake, tmp_path):
    """Start sdk_worker.py against `fake`; every worker still running at the end is stopped (and must exit 0)."""
    workers: list[WorkerProcess] = []
    markers = tmp_path / "markers"
    markers.mkdir()

    async def start(concurrency: int, handler: str = "async") -> WorkerProcess:
        env = _worker_env(fake, markers, concurrency, handler)
        log_path = tmp_path / f"worker-{len(workers)}.log"
        worker = await WorkerProcess([sys.executable, str(WORKER_SCRIPT)], env, log_path, cwd=str(REPO)).start()
        worker.markers = markers
        workers.append(worker)
        return worker

    yield start
    # Reached with a running worker only when a test failed before its own stop(): just do not leak it.
    for worker in workers:
        if worker.process is not None and worker.process.returncode is None:
            await worker.stop(timeout_s=10)


async def _stop(worker: WorkerProcess) -> None:
    status = await worker.stop(timeout_s=60)
    log = worker.log_text()
    assert status == 0, f"worker exited with {status}; log:\n{log[-4000:]}"
    assert "Uncaught exception" not in log, log[-4000:]


async def _wait_for_file(path: Path, worker: WorkerProcess, timeout_s: float = RUN_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not path.exists():
        if loop.time() > deadline or worker.process.returncode is not None:
            raise AssertionError(f"{path.name} never appeared; worker log:\n{worker.log_text()[-4000:]}")
        await asyncio.sleep(0.05)


async def test_sdk_runs_every_job_with_the_configured_concurrency_and_stops_cleanly(fake, start_worker):
    concurrency = 8
    inputs = [{"n": n, "wait_full": True} for n in range(40)]
    job_ids = fake.enqueue_many(inputs)
    worker = await start_worker(concurrency)
    try:
        jobs = await fake.wait_done(job_ids, RUN_TIMEOUT_S)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; worker log:\n{worker.log_text()[-4000:]}") from None

    assert [jobs[i].state for i in job_ids] == [COMPLETED] * 40
    assert [jobs[i].output["echo"] for i in job_ids] == inputs
    peaks = [jobs[i].output["peak"] for i in job_ids]
    # The handler saw exactly `concurrency` jobs at once at its busiest: never more, and the slots did fill.
    assert max(peaks) == concurrency
    assert fake.max_in_progress <= concurrency
    assert all(job.result_posts == 1 for job in jobs.values())
    # The SDK asked for jobs in batches no larger than its free slots, saying whether it already held some.
    assert all(1 <= take.batch_size <= concurrency for take in fake.take_requests)
    first = fake.take_requests[0]
    assert (first.path, first.batch_size, first.job_in_progress) == ("job-take-batch", concurrency, "0")
    assert {take.worker_id for take in fake.take_requests} == {fake.worker_id}
    assert sum(take.jobs_given for take in fake.take_requests) == 40

    # The heartbeat process pings with the worker id and the SDK's version.
    assert await fake.wait_until(lambda: len(fake.pings) > 0, RUN_TIMEOUT_S)
    assert fake.pings[0].worker_id == fake.worker_id
    assert fake.pings[0].runpod_version == importlib.metadata.version("runpod")
    assert fake.auth_failures == 0 and fake.unknown_posts == []

    await _stop(worker)


async def test_failed_job_and_progress_updates_reach_the_service(fake, start_worker):
    failing = fake.enqueue({"mode": "fail"})
    progressing = fake.enqueue({"mode": "progress"})
    worker = await start_worker(2)
    jobs = await fake.wait_done([failing, progressing], RUN_TIMEOUT_S)

    # A returned {"error": ...} marks the job FAILED; the SDK lifts "error" to the top and keeps the other keys.
    assert jobs[failing].state == FAILED
    assert jobs[failing].result == {"error": "failing as asked", "output": {"error_code": "test_failure"}}
    assert jobs[progressing].state == COMPLETED
    # progress_update posts from a thread and may land after the result; wait for it on its own.
    assert await fake.wait_until(lambda: jobs[progressing].progress == [{"step": 1}], RUN_TIMEOUT_S)
    await _stop(worker)


async def test_cancelled_jobs_are_dequeued_or_stopped_in_the_worker(fake, start_worker):
    running = fake.enqueue({"mode": "block"})
    worker = await start_worker(2)
    await _wait_for_file(worker.markers / f"{running}.started", worker)

    # Queued and cancelled in the same loop step: it can never be handed out.
    queued = fake.enqueue({"mode": "echo"})
    assert fake.cancel(queued) == "dequeued"
    # Held by the worker: the stop goes out on the job-stop channel and the SDK cancels the handler's task.
    assert fake.cancel(running) == "stopping"
    await _wait_for_file(worker.markers / f"{running}.cancelled", worker)

    after = fake.enqueue({"mode": "echo", "n": 1})
    jobs = await fake.wait_done([after], RUN_TIMEOUT_S)
    assert jobs[after].output["echo"] == {"mode": "echo", "n": 1}

    assert fake.jobs[running].stop_sent and fake.jobs[running].state == CANCELLED
    assert fake.jobs[queued].taken_at is None and not (worker.markers / f"{queued}.started").exists()
    await _stop(worker)
    # A stopped job gets no result from the SDK, not even late.
    assert fake.jobs[running].result is None and fake.jobs[running].late_results == []
    assert fake.jobs[running].result_posts == 0


async def test_result_posts_are_retried_on_5xx_and_dropped_after_three_attempts(fake, start_worker):
    fake.fail_result_posts(2, status=503)
    retried = fake.enqueue({"n": "retried"})
    worker = await start_worker(1)
    jobs = await fake.wait_done([retried], RUN_TIMEOUT_S)
    assert jobs[retried].state == COMPLETED and jobs[retried].result_posts == 3

    lost = fake.enqueue({"n": "lost"}, job_id="lost-job")
    fake.fail_result_posts(3, status=500, job_id="lost-job")
    rejected = fake.enqueue({"n": "rejected"}, job_id="rejected-job")
    fake.fail_result_posts(1, status=400, job_id="rejected-job")
    last = fake.enqueue({"n": "last"})
    # With one slot the jobs run in order, so once `last` is done the SDK has given up on the two before it.
    await fake.wait_done([last], RUN_TIMEOUT_S)
    assert (fake.jobs[lost].state, fake.jobs[lost].result_posts) == (IN_PROGRESS, 3)
    assert (fake.jobs[rejected].state, fake.jobs[rejected].result_posts) == (IN_PROGRESS, 1)
    assert fake.jobs[lost].result is None and fake.jobs[rejected].result is None
    await _stop(worker)


async def test_generator_handler_streams_chunks_then_the_aggregate(fake, start_worker):
    job_id = fake.enqueue({"chunks": 3})
    worker = await start_worker(1, handler="stream")
    jobs = await fake.wait_done([job_id], RUN_TIMEOUT_S)
    assert jobs[job_id].stream == [{"output": {"chunk": i}} for i in range(3)]
    assert jobs[job_id].result == {"output": [{"chunk": i} for i in range(3)]}
    await _stop(worker)


async def test_job_take_long_polls_then_answers_204_and_needs_the_api_key(fake):
    env = fake.env()
    take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", fake.worker_id)
    auth = {"Authorization": fake.api_key}
    async with aiohttp.ClientSession() as session:
        async with session.get(take_url + "&job_in_progress=0", headers=auth) as response:
            assert response.status == 204
        async with session.get(take_url + "&job_in_progress=0", headers={"Authorization": "wrong"}) as response:
            assert response.status == 401
        first, second = fake.enqueue({"a": 1}), fake.enqueue({"b": 2})
        async with session.get(take_url + "&job_in_progress=0", headers=auth) as response:
            assert await response.json() == {"id": first, "input": {"a": 1}}
        batch_url = take_url.replace("/job-take/", "/job-take-batch/") + "&batch_size=5&job_in_progress=1"
        async with session.get(batch_url, headers=auth) as response:
            assert await response.json() == [{"id": second, "input": {"b": 2}}]
        done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", fake.worker_id)
        async with session.post(
            done_url.replace("$ID", "no-such-job") + "&isStream=false", data="{}", headers=auth
        ) as response:
            assert response.status == 404
    assert fake.auth_failures == 1
    assert [(t.path, t.batch_size, t.job_in_progress, t.jobs_given) for t in fake.take_requests] == [
        ("job-take", 1, "0", 0), ("job-take", 1, "0", 1), ("job-take-batch", 5, "1", 1),
    ]  # fmt: skip


def test_command_line_runs_a_worker_against_the_fake_and_summarizes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(FAKE_WORKER_CONCURRENCY="4", FAKE_WORKER_MARKER_DIR=str(tmp_path), RUNPOD_LOG_LEVEL="INFO")
    result = subprocess.run(
        [
            sys.executable, "-m", "testing.runpod_fake", "--jobs", "6", "--input", str(REPO / "test_input.json"),
            "--timeout-s", str(RUN_TIMEOUT_S), "--worker-log", str(tmp_path / "worker.log"),
            "--", sys.executable, str(WORKER_SCRIPT),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)
    assert summary["states"] == {COMPLETED: 6}
    assert summary["worker_exit_status"] == 0
    assert "export RUNPOD_WEBHOOK_GET_JOB=" in result.stderr
