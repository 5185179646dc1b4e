"""The endpoint target with --stream reads a job's items from RunPod's /stream/{id} as they come, against a
loopback app that answers as api.runpod.ai does (/health, /run, then /stream reads that each give the items posted
since the last read, and the job's status); the time to first audio is when the first audio item reached it."""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from bench.targets import EndpointTarget
from bench.workload import JobSpec
from testing.loopback import LoopbackApp

AUDIO = {"type": "audio", "index": 0, "audio": "AAAA", "encoding": "pcm_s16le", "sample_rate": 24000}
RESULT = {"type": "result", "audio_url": "https://x/y.wav", "duration": 3.5, "queue_wait": 0.1,
          "generation_time": 2.0, "batch_size": 2, "time_to_first_audio": 0.4}  # fmt: skip


def _app(reads: list[dict], seen: list[tuple[str, float]]) -> web.Application:
    async def health(request):
        return web.json_response({"jobs": {}, "workers": {"idle": 1}})

    async def run(request):
        body = await request.json()
        assert body["input"]["gen_text"]
        return web.json_response({"id": "job-1", "status": "IN_QUEUE"})

    async def stream(request):
        seen.append((request.method, time.monotonic()))
        return web.json_response(reads.pop(0))

    async def status(request):
        seen.append(("status", time.monotonic()))
        return web.json_response({"id": "job-1", "status": "COMPLETED", "output": [AUDIO, RESULT]})

    app = web.Application()
    app.router.add_get("/ep/health", health)
    app.router.add_post("/ep/run", run)
    app.router.add_get("/ep/stream/{job_id}", stream)
    app.router.add_get("/ep/status/{job_id}", status)
    return app


def _to_input(job: JobSpec) -> dict:
    return {"gen_text": job.text, "language": job.language, "voice_id": f"v{job.voice}"}


async def _run(reads):
    seen: list = []
    async with LoopbackApp(_app(reads, seen)) as server:
        target = await EndpointTarget(server.url, "ep", _to_input, stream=True, poll_interval_s=0.05).start()
        try:
            started = time.monotonic()
            record = await target.run_job(JobSpec(0, "Olá mundo.", "pt", 0, "sentence", 1), 10.0)
        finally:
            await target.close()
    return record, seen, started


async def test_the_first_audio_item_is_timed_where_the_stream_gave_it():
    reads = [
        {"status": "IN_PROGRESS", "stream": []},
        {"status": "IN_PROGRESS", "stream": [{"output": AUDIO}]},
        {"status": "IN_PROGRESS", "stream": []},
        {"status": "COMPLETED", "stream": [{"output": dict(AUDIO, index=1)}, {"output": RESULT}]},
    ]
    record, seen, started = await _run(reads)
    assert record.ok, record.error
    assert [m for m, _ in seen] == ["GET"] * 4  # the result came with the stream: no /status read
    second, last = seen[1][1] - started, seen[3][1] - started
    assert second <= record.first_audio_s < seen[2][1] - started
    assert record.latency_s >= last > record.first_audio_s
    assert (record.audio_s, record.queue_wait_s, record.batch_size) == (3.5, 0.1, 2)


async def test_a_stream_that_ends_without_the_result_item_reads_it_from_status():
    reads = [{"status": "COMPLETED", "stream": [{"output": AUDIO}]}]
    record, seen, _ = await _run(reads)
    assert record.ok and record.first_audio_s is not None and record.audio_s == 3.5
    assert [m for m, _ in seen] == ["GET", "status"]


async def test_a_failed_stream_keeps_its_error():
    reads = [{"status": "FAILED", "error": "[ref_audio_not_found] gs://b/v.wav was not found", "stream": []}]
    record, _, _ = await _run(reads)
    assert record.status == "FAILED" and record.error.startswith("[ref_audio_not_found]")
    assert record.first_audio_s is None


def test_streaming_needs_run_mode():
    with pytest.raises(ValueError, match="mode must be run"):
        EndpointTarget("http://127.0.0.1:1", "ep", _to_input, mode="runsync", stream=True)
