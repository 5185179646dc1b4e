"""SERVER_MODE=http through the real `openai` client, against the real `python -m server` (tiny demo checkpoint on
CPU) with the GCS emulator as its storage (tests/http/conftest.py): streamed pcm, wav and SSE, whole mp3 and
flac, each compared with the same seed through POST /tts (the queue worker's path: the stored object); 16
concurrent streams batched together (Prometheus' xtts_batch_size_rows); errors as the client's own exceptions;
clients that drop mid-stream leave nothing running behind."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile as sf

from testing.http_worker import API_KEY, BUCKET, HttpWorker

pytestmark = pytest.mark.slow

TEXT = "Olá! Uma frase curta para o teste. E outra."
SEED = 11
PCM_ATOL = 2 / 32767  # two 16-bit steps: streamed and stored audio are the same samples, each rounded once


@pytest.fixture(scope="module")
def reference_take(http_worker: HttpWorker, http_bucket) -> tuple[dict, np.ndarray]:
    """TEXT with SEED through POST /tts (the seed's input and output): its output, and the stored WAV's samples."""
    status, response = http_worker.post_json("/tts", {
        "gen_text": TEXT, "voice_id": "voz_joao", "ref_audio_url": f"gs://{BUCKET}/referencias/voz_joao.wav",
        "seed": SEED, "output_format": "wav"})  # fmt: skip
    assert status == 200, response
    assert response["audio_url"].startswith(http_bucket.url) and "X-Goog-Signature=" in response["audio_url"]
    assert set(response) >= {"audio_url", "duration", "voice_id", "language", "generation_time", "parameters"}
    audio, sr = sf.read(io.BytesIO(http_bucket.get_object(BUCKET, response["object_name"])), dtype="float32")
    assert sr == 24000 and abs(len(audio) / sr - response["duration"]) < 0.01
    return response, audio


def speak(worker: HttpWorker, **options):
    return worker.client().audio.speech.with_streaming_response.create(
        model="tts-1", input=TEXT, voice="voz_joao", extra_body={"seed": SEED}, **options)  # fmt: skip


def test_streamed_pcm_is_the_same_audio_as_the_tts_result(http_worker, reference_take):
    _, expected = reference_take
    with speak(http_worker, response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm" and "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked" and response.headers["x-audio-sample-rate"] == "24000"
        body = response.read()
    pcm = np.frombuffer(body, "<i2") / 32767.0
    assert len(pcm) == len(expected)
    np.testing.assert_allclose(pcm, expected, rtol=0, atol=PCM_ATOL)


def test_streamed_wav_decodes_to_the_same_audio(http_worker, reference_take):
    _, expected = reference_take
    with speak(http_worker, response_format="wav") as response:
        body = response.read()
    assert body[4:8] == b"\xff\xff\xff\xff" and body[40:44] == b"\xff\xff\xff\xff"  # a streaming header, as OpenAI's
    audio, sr = sf.read(io.BytesIO(body), dtype="float32")
    assert sr == 24000 and len(audio) == len(expected)
    np.testing.assert_allclose(audio, expected, rtol=0, atol=PCM_ATOL)


@pytest.mark.parametrize("fmt", ["mp3", "flac"])
def test_whole_formats_decode_to_the_results_duration(http_worker, reference_take, fmt):
    output, expected = reference_take
    response = http_worker.client().audio.speech.with_raw_response.create(
        model="tts-1-hd", input=TEXT, voice="voz_joao", response_format=fmt, extra_body={"seed": SEED})  # fmt: skip
    data = response.content
    assert response.headers["content-type"] == {"mp3": "audio/mpeg", "flac": "audio/flac"}[fmt]
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == 24000 and float(response.headers["x-audio-duration"]) == pytest.approx(len(expected) / sr, abs=1e-5)
    assert abs(len(audio) / sr - output["duration"]) < 0.01
    if fmt == "flac":  # lossless: the very samples
        np.testing.assert_allclose(audio, expected, rtol=0, atol=PCM_ATOL)


def test_sse_events_carry_the_audio_then_done(http_worker, reference_take):
    _, expected = reference_take
    with speak(http_worker, response_format="pcm", stream_format="sse") as response:
        assert response.headers["content-type"] == "text/event-stream"
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    deltas, done = events[:-1], events[-1]
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas) and done["type"] == "speech.audio.done"
    pcm = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in deltas), "<i2") / 32767.0
    np.testing.assert_allclose(pcm, expected, rtol=0, atol=PCM_ATOL)
    assert done["usage"]["input_tokens"] == len(TEXT) and done["usage"]["output_tokens"] > 0


def test_sixteen_concurrent_streams_all_get_their_audio_in_shared_batches(http_worker):
    before = http_worker.metrics()

    def one(i: int) -> bytes:
        with http_worker.client().audio.speech.with_streaming_response.create(
            model="tts-1", input=f"Olá, cliente {i}.", voice=("voz_joao", "voz_ana")[i % 2],
            response_format="pcm", extra_body={"seed": i},
        ) as response:  # fmt: skip
            return response.read()

    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(one, range(16)))
    assert all(len(body) > 24000 * 2 * 0.5 and len(body) % 2 == 0 for body in bodies), [len(b) for b in bodies]
    delta = http_worker.metrics().minus(before)
    assert delta.jobs("completed") == 16
    print(f"\nbatches by size: {delta.batch_size_counts()}")
    assert delta.batches > delta.batches_of_one, "no decoding step carried more than one row"
    assert delta.batch_rows / delta.batches > 2


def test_errors_arrive_as_the_clients_own_exceptions(http_worker):
    speech = http_worker.client().audio.speech
    with pytest.raises(openai.NotFoundError) as caught:
        speech.create(model="tts-1", input="Oi", voice="ninguem")
    assert caught.value.code == "ref_audio_not_found"
    assert caught.value.body["message"] == ("[ref_audio_not_found] reference audio not found: "
                                            f"gs://{BUCKET}/referencias/ninguem.wav")  # fmt: skip
    with pytest.raises(openai.AuthenticationError) as caught:
        http_worker.client(api_key="sk-wrong").audio.speech.create(model="tts-1", input="Oi", voice="voz_joao")
    assert caught.value.code == "invalid_api_key"
    assert http_worker.metrics().get("xtts_http_refusals_total", code="invalid_api_key") >= 1
    with pytest.raises(openai.BadRequestError) as caught:
        speech.create(model="tts-1", input="Oi", voice="voz_joao", speed=3.0)
    assert caught.value.code == "out_of_range" and caught.value.param == "speed"
    assert caught.value.body["message"].startswith("[out_of_range] speed must be >= 0.5 and <= 2, got 3.0")
    log = http_worker.log_text()
    assert API_KEY not in log and "sk-wrong" not in log  # keys never reach the log


def test_clients_that_drop_mid_stream_free_their_rows(http_worker):
    before = http_worker.metrics()
    long_text = " ".join(["Esta frase longa continua por bastante tempo, para que o stream dure."] * 4)

    def drop(i: int) -> int:
        with http_worker.client().audio.speech.with_streaming_response.create(
            model="tts-1", input=long_text, voice="voz_ana", response_format="pcm", extra_body={"seed": 100 + i},
        ) as response:  # fmt: skip
            first = next(response.iter_bytes())
        return len(first)  # leaving the block closes the connection with the body unread

    with ThreadPoolExecutor(8) as pool:
        assert all(n > 0 for n in pool.map(drop, range(8)))
    deadline = time.monotonic() + 120
    while True:
        now = http_worker.metrics()
        idle = (now.get("xtts_queue_depth_requests"), now.get("xtts_running_rows"), now.in_flight) == (0, 0, 0)
        if idle and now.minus(before).jobs("cancelled") == 8:
            break
        assert time.monotonic() < deadline, ("rows not freed", now.get("xtts_queue_depth_requests"),
                                             now.get("xtts_running_rows"), now.in_flight)  # fmt: skip
        time.sleep(0.25)
    # ... and the worker serves the next request.
    body = http_worker.client().audio.speech.create(model="tts-1", input="Ainda aqui.", voice="voz_joao",
                                                    response_format="pcm").content  # fmt: skip
    assert len(body) > 0
