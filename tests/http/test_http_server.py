"""server.http_server in this process, driven by the real `openai` client (AsyncOpenAI) and aiohttp: admission (key,
state, MAX_CONCURRENCY -> 429), error shapes, a failure after the status was sent, a client that disconnects. The
storage side is real (local backend, reference cache: testing/handler_world.py's `world`); the scheduler is a
hand-written stand-in (`FakeSpeech`) so each test decides when audio comes, whether it fails, and sees its stream
closed. The real process, engine and GCS emulator are in test_openai_client.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import httpx2  # the openai client's HTTP library
import numpy as np
import openai
import pytest
import soundfile as sf

from batching import SpeechResult
from batching.errors import BatchError
from batching.streaming import AudioChunk
from server.http_server import MAX_BODY_BYTES, HttpApi
from testing.handler_world import sample, world  # noqa: F401  (the fixture)
from testing.loopback import LoopbackApp

KEY = "test-key-0123456789"
SR = 24000
CHUNK_S = 0.25
TEMPLATE = "gs://local/referencias/{voice}.wav"  # world's reference: <LOCAL_STORAGE_DIR>/local/referencias/voz_joao.wav


class FakeSpeech:
    """Stands in for batching.Scheduler: `stream` gives `chunks` AudioChunks of CHUNK_S seconds (a tone whose
    pitch is the text's length, so requests differ), then their SpeechResult; `submit` gives the result alone.
    `gate` (when set) holds every request before its first audio; `fail_after` fails a stream after that many
    chunks; `closed` counts streams that ended early (their generator closed: the caller went away)."""

    from time import monotonic as clock

    def __init__(self, chunks: int = 3, *, gate: asyncio.Event | None = None, fail_after: int | None = None,
                 pause_s: float = 0.0):  # fmt: skip
        self.chunks = chunks
        self.gate = gate
        self.fail_after = fail_after
        self.pause_s = pause_s
        self.started = 0
        self.closed = 0
        self.requests = []

    def audio(self, text: str) -> np.ndarray:
        t = np.arange(int(SR * CHUNK_S) * self.chunks) / SR
        return (0.3 * np.sin(2 * np.pi * (100 + len(text)) * t)).astype(np.float32)

    def result(self, wav: np.ndarray) -> SpeechResult:
        return SpeechResult(wav=wav, sample_rate=SR, duration_s=len(wav) / SR, segments=1, queue_wait_s=0.0,
                            engine_s=0.1, conditioning_s=0.0, latent_cache_hit=True, batch_sizes=(1,))  # fmt: skip

    async def submit(self, request):
        self.requests.append(request)
        await request.load_reference()
        if self.gate is not None:
            await self.gate.wait()
        return self.result(self.audio(request.text))

    async def stream(self, request):
        self.requests.append(request)
        await request.load_reference()
        self.started += 1
        wav = self.audio(request.text)
        step = int(SR * CHUNK_S)
        finished = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            for i in range(self.chunks):
                if self.fail_after is not None and i == self.fail_after:
                    raise BatchError("the batch broke mid-stream")
                yield AudioChunk(0, wav[i * step: (i + 1) * step], i * step, SR)
                await asyncio.sleep(self.pause_s)
            finished = True
            yield self.result(wav)
        finally:
            if not finished:
                self.closed += 1


@pytest.fixture
async def serve(world):  # noqa: F811
    """serve(scheduler, state="ready", **config) -> (HttpApi, base URL): the API on 127.0.0.1, its handler context
    built on `world` with that scheduler (a WorkerConfig with `config` changes; API_KEY=KEY by default)."""
    servers = []

    async def start(scheduler, *, state="ready", **config):
        context = world["handler_for"].context_for(scheduler, **{"api_key": KEY, "voice_ref_url_template": TEMPLATE,
                                                                 **config})  # fmt: skip
        api = HttpApi(context.config, context.metrics)
        if state == "ready":
            api.ready(context)
        server = await LoopbackApp(api.app(), access_log=None, handler_cancellation=True).start()
        servers.append(server)
        return api, server.url

    yield start
    for server in servers:
        await server.stop()


def client(url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def test_streamed_pcm_is_every_chunk_in_order(serve):
    fake = FakeSpeech(chunks=4)
    api, url = await serve(fake)
    async with client(url).audio.speech.with_streaming_response.create(
        model="tts-1", input="Olá, mundo.", voice="voz_joao", response_format="pcm", extra_body={"seed": 5},
    ) as response:  # fmt: skip
        assert response.headers["content-type"] == "audio/pcm" and response.headers["x-audio-sample-rate"] == "24000"
        assert response.headers["x-request-id"].startswith("http-")
        body = b"".join([piece async for piece in response.iter_bytes()])
    samples = np.frombuffer(body, "<i2") / 32767.0
    np.testing.assert_allclose(samples, fake.audio("Olá, mundo."), atol=1 / 32767)
    (request,) = fake.requests
    assert request.params.seed == 5 and request.text == "Olá, mundo."
    assert api.in_flight == 0


async def test_sse_events_carry_the_audio_then_done_with_usage(serve):
    fake = FakeSpeech(chunks=3)
    _, url = await serve(fake)
    async with client(url).audio.speech.with_streaming_response.create(
        model="tts-1", input="Oi!", voice="voz_joao", response_format="wav", stream_format="sse",
    ) as response:  # fmt: skip
        assert response.headers["content-type"] == "text/event-stream"
        lines = [line async for line in response.iter_lines()]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    audio, _ = sf.read(io.BytesIO(b"".join(base64.b64decode(e["audio"]) for e in events[:-1])), dtype="float32")
    assert len(audio) == len(fake.audio("Oi!"))
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == 3 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_a_whole_file_format_has_its_length_and_duration(serve):
    fake = FakeSpeech(chunks=4)
    _, url = await serve(fake)
    response = await client(url).audio.speech.with_raw_response.create(model="tts-1-hd", input="Olá", voice="voz_joao",
                                                                       response_format="flac")  # fmt: skip
    data = response.content
    assert response.headers["content-type"] == "audio/flac" and int(response.headers["content-length"]) == len(data)
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SR and len(audio) == len(fake.audio("Olá"))
    assert float(response.headers["x-audio-duration"]) == pytest.approx(4 * CHUNK_S)
    assert fake.started == 0  # a whole-file format goes through submit, not the (costlier) streaming path


async def test_the_api_key_is_required_and_ping_stays_open(serve):
    _, url = await serve(FakeSpeech())
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(url, key="wrong").audio.speech.create(model="tts-1", input="Oi", voice="voz_joao")
    assert caught.value.code == "invalid_api_key" and "Authorization: Bearer" in caught.value.body["message"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/tts", json={}) as response:  # no header at all
            assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"
        async with session.get(f"{url}/ping") as response:
            assert response.status == 200


async def test_a_worker_still_loading_answers_ping_204_and_work_503(serve):
    _, url = await serve(FakeSpeech(), state="starting")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.get(f"{url}/ping") as response:
            assert response.status == 204
        async with session.post(f"{url}/v1/audio/speech", json={"input": "Oi", "voice": "voz_joao"}) as response:
            error = (await response.json())["error"]
            assert response.status == 503 and error["code"] == "worker_starting" and response.headers["Retry-After"]


async def test_over_max_concurrency_is_429_with_retry_after_at_once_and_counted(serve):
    gate = asyncio.Event()
    fake = FakeSpeech(gate=gate)
    api, url = await serve(fake, max_concurrency=2)
    speech = client(url).audio.speech
    held = [asyncio.create_task(speech.create(model="tts-1", input=f"Frase {i}", voice="voz_joao",
                                              response_format="pcm")) for i in range(2)]  # fmt: skip
    while api.in_flight < 2:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        await asyncio.wait_for(speech.create(model="tts-1", input="Mais uma", voice="voz_joao"), 5)
    assert caught.value.code == "over_capacity" and "MAX_CONCURRENCY=2" in caught.value.body["message"]
    assert caught.value.response.headers["retry-after"] == "1"
    assert api.metrics.registry.get_sample_value("xtts_http_refusals_total", {"code": "over_capacity"}) == 1
    gate.set()
    bodies = await asyncio.gather(*held)
    assert all(len(body.content) == 2 * len(fake.audio("Frase 0")) for body in bodies)
    assert api.in_flight == 0
    # A freed slot serves again.
    assert (await speech.create(model="tts-1", input="Agora sim", voice="voz_joao", response_format="pcm")).content


async def test_errors_are_openais_shape_with_our_code_and_message(serve, world):  # noqa: F811
    _, url = await serve(FakeSpeech())
    speech = client(url).audio.speech
    with pytest.raises(openai.NotFoundError) as caught:
        await speech.create(model="tts-1", input="Oi", voice="nao_existe")
    assert caught.value.code == "ref_audio_not_found"
    assert caught.value.body["message"] == ("[ref_audio_not_found] reference audio not found: "
                                            "gs://local/referencias/nao_existe.wav")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        await speech.create(model="tts-1", input="Oi", voice="voz_joao", speed=4.0)
    assert caught.value.code == "out_of_range" and caught.value.param == "speed"
    assert "OpenAI's API allows 0.25 to 4.0" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        await speech.create(model="tts-1", input="Oi", voice="voz_joao", extra_body={"temprature": 0.5})
    assert caught.value.code == "unknown_field" and caught.value.param == "temprature"
    with pytest.raises(openai.BadRequestError) as caught:
        await speech.create(model="tts-1", input=" ", voice="voz_joao")
    assert caught.value.body["message"] == "[invalid_input] input must not be empty" and caught.value.param == "input"
    # The refused requests were logged and counted as invalid jobs, as in queue mode.
    assert sample(world, "xtts_jobs_total", status="invalid", language="unknown") == 3
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(f"{url}/v1/audio/speech", data=b"{not json") as response:
            assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"
        async with session.post(f"{url}/v1/audio/speech", data=b" " * (MAX_BODY_BYTES + 1)) as response:
            assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"
        async with session.get(f"{url}/v1/models") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


async def test_tts_answers_the_seeds_output_or_its_error(serve):
    _, url = await serve(FakeSpeech())
    job = {"gen_text": "Olá!", "ref_audio_url": TEMPLATE.format(voice="voz_joao"), "voice_id": "voz_joao"}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(f"{url}/tts", json=job) as response:
            output = await response.json()
            assert response.status == 200 and output["audio_url"].startswith("file://") and output["duration"] == 0.75
        async with session.post(f"{url}/tts", json={**job, "language": "xx"}) as response:
            error = (await response.json())["error"]
            assert response.status == 400 and error["code"] == "unsupported_language"
            assert error["message"].startswith("[unsupported_language] language 'xx' is not supported")


async def test_a_failure_after_the_status_cuts_the_audio_and_ends_sse_with_an_error(serve):
    _, url = await serve(FakeSpeech(chunks=4, fail_after=1))
    with pytest.raises(httpx2.RemoteProtocolError, match="incomplete chunked read"):  # never a complete-looking file
        async with client(url).audio.speech.with_streaming_response.create(
            model="tts-1", input="Oi", voice="voz_joao", response_format="pcm",
        ) as response:  # fmt: skip
            assert response.status_code == 200
            async for _ in response.iter_bytes():
                pass
    async with client(url).audio.speech.with_streaming_response.create(
        model="tts-1", input="Oi", voice="voz_joao", response_format="pcm", stream_format="sse",
    ) as response:  # fmt: skip
        lines = [line async for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
    assert events[-1]["error"]["code"] == "generation_failed"
    assert events[-1]["error"]["message"] == "[generation_failed, retryable] the batch broke mid-stream"


async def test_a_client_that_disconnects_mid_stream_closes_its_scheduler_stream(serve, world):  # noqa: F811
    fake = FakeSpeech(chunks=40, pause_s=0.05)
    api, url = await serve(fake)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        response = await session.post(f"{url}/v1/audio/speech",
                                      json={"input": "Uma frase longa", "voice": "voz_joao", "response_format": "pcm"})
        assert response.status == 200
        await response.content.readany()  # the first audio arrived
        response.close()  # ... and the client is gone
    for _ in range(200):
        if fake.closed == 1 and api.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert fake.closed == 1 and api.in_flight == 0
    assert sample(world, "xtts_jobs_total", status="cancelled", language="pt") == 1
    assert sample(world, "xtts_jobs_in_flight") == 0
