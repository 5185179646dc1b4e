"""bench.targets.HttpTarget against a loopback app that answers as an OpenAI speech server does: the request it
sends (OpenAI's fields and the worker's own), first-byte and last-byte timing of a streamed PCM body, errors in
OpenAI's shape, and a body that is not 16-bit PCM."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from bench.targets import EndpointError, HttpTarget
from bench.workload import JobSpec
from testing.loopback import LoopbackApp

JOB = JobSpec(3, "Olá mundo, tudo bem?", "pt", 2, "sentence", 77)


def _to_input(job: JobSpec) -> dict:
    return job.to_input("gs://bench/voices/voice-{voice:03d}.wav")


def _app(seen: list, *, status: int = 200, parts=(b"\x01\x00" * 2400, b"\x02\x00" * 24000)) -> web.Application:
    async def speech(request):
        seen.append((await request.json(), request.headers.get("Authorization")))
        if status != 200:
            return web.json_response({"error": {"message": "[unknown_voice] voice 'x' has no reference",
                                                "type": "invalid_request_error", "code": "unknown_voice"}},
                                     status=status)  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await response.prepare(request)
        for part in parts:
            await asyncio.sleep(0.3)
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/audio/speech", speech)
    return app


async def _run(app, **kwargs):
    async with LoopbackApp(app) as server:
        target = await HttpTarget(server.url, _to_input, **kwargs).start()
        try:
            return await target.run_job(JOB, 10.0)
        finally:
            await target.close()


async def test_a_streamed_pcm_body_is_timed_at_its_first_and_last_byte():
    seen = []
    started = time.monotonic()
    record = await _run(_app(seen), api_key="k-123")
    assert record.ok, record.error
    (body, auth), = seen
    assert body == {"model": "xtts-v2", "input": JOB.text, "voice": "bench-voice-002", "response_format": "pcm",
                    "stream_format": "audio", "speed": 1.0, "ref_audio_url": "gs://bench/voices/voice-002.wav",
                    "language": "pt", "temperature": 0.75, "top_k": 50, "top_p": 0.85, "seed": 77}  # fmt: skip
    assert auth == "Bearer k-123"
    assert 0.25 <= record.first_audio_s < record.latency_s - 0.2 <= time.monotonic() - started
    assert record.audio_s == (4800 + 48000) / 2 / 24000


async def test_an_openai_error_keeps_its_status_and_message():
    record = await _run(_app([], status=404))
    assert record.status == "FAILED" and record.first_audio_s is None
    assert record.error == "HTTP 404: [unknown_voice] voice 'x' has no reference"


async def test_a_body_that_is_not_16_bit_pcm_fails():
    record = await _run(_app([], parts=(b"\x01\x02\x03",)))
    assert record.status == "FAILED" and "3 bytes" in record.error


async def test_a_remote_url_needs_a_key_and_is_refused_before_any_connection():
    with pytest.raises(EndpointError, match="RUNPOD_API_KEY"):
        await HttpTarget("https://example.invalid", _to_input).start()
