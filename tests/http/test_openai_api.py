"""server.openai_api: OpenAI's speech request onto the seed's input (same rules, same codes; fields named as the
caller sent them) and the one table from error codes to HTTP statuses; storage.audio: each response format
decodes to the audio it was given, whether streamed piece by piece or encoded whole."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import batching.errors
import storage.errors
from server.openai_api import STATUS_BY_CODE, ApiError, error_body, speech_call, status_for
from server.validation import ValidationError
from storage.audio import RESPONSE_FORMATS, StreamEncoder, encode_whole
from storage.audio import RESPONSE_TABLE as FORMATS

TEMPLATE = "gs://my-bucket/voices/{voice}.wav"


def call(body, template=TEMPLATE, **options):
    return speech_call(body, max_text_chars=options.get("max_text_chars", 50), default_language="pt",
                       voice_template=template)  # fmt: skip


def refusal(body, template=TEMPLATE, **options) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        call(body, template, **options)
    return caught.value


def test_openais_request_maps_onto_the_seeds_input():
    c = call({"model": "tts-1", "input": " Olá! ", "voice": "maria.news", "speed": 1.5, "response_format": "WAV",
              "language": "en", "temperature": 0.5, "top_k": 20, "top_p": 0.9, "repetition_penalty": 2.0, "seed": 7})
    r = c.request
    assert (r.gen_text, r.voice_id, r.ref_audio_url) == ("Olá!", "maria.news", "gs://my-bucket/voices/maria.news.wav")
    assert (r.speed, r.language, r.temperature, r.top_k, r.top_p, r.repetition_penalty, r.seed) == (
        1.5, "en", 0.5, 20, 0.9, 2.0, 7)  # fmt: skip
    assert (c.model, c.response_format, c.stream_format) == ("tts-1", "wav", "audio")


def test_defaults_are_openais_and_any_model_name_is_the_one_model():
    c = call({"input": "Oi", "voice": {"id": "voz_1"}})  # OpenAI's custom-voice object
    assert (c.model, c.response_format, c.stream_format, c.request.voice_id) == ("xtts-v2", "mp3", "audio", "voz_1")
    assert call({"model": "tts-1-hd", "input": "Oi", "voice": "v", "stream_format": "sse"}).stream_format == "sse"


def test_ref_audio_url_overrides_the_template_and_is_required_without_one():
    assert call({"input": "Oi", "voice": "v", "ref_audio_url": "gs://b/x.wav"}).request.ref_audio_url == "gs://b/x.wav"
    error = refusal({"input": "Oi", "voice": "v"}, template=None)
    assert (error.error_code, error.field) == ("missing_field", "ref_audio_url")
    assert "VOICE_REF_URL_TEMPLATE" in str(error) and "extra_body" in str(error)


@pytest.mark.parametrize(
    ("body", "code", "field", "message"),
    [
        ({"voice": "v"}, "missing_field", "input", "input is required"),
        ({"input": "   ", "voice": "v"}, "invalid_input", "input", "input must not be empty"),
        ({"input": "x" * 51, "voice": "v"}, "text_too_long", "input",
         "input is 51 characters long; the limit is 50 (MAX_TEXT_CHARS)"),
        ({"input": "Oi"}, "missing_field", "voice", "voice is required: a voice id"),
        ({"input": "Oi", "voice": "../etc"}, "invalid_voice_id", "voice", "voice must be 1 to 128 characters"),
        ({"input": "Oi", "voice": 3}, "invalid_type", "voice", "voice must be a string"),
        ({"input": "Oi", "voice": "v", "speed": 0.25}, "out_of_range", "speed",
         "speed must be >= 0.5 and <= 2, got 0.25 (XTTS-v2's range on this server; OpenAI's API allows 0.25 to 4.0)"),
        ({"input": "Oi", "voice": "v", "response_format": "ogg"}, "invalid_input", "response_format",
         "response_format must be one of mp3, opus, aac, flac, wav, pcm, got 'ogg'"),
        ({"input": "Oi", "voice": "v", "stream_format": "chunks"}, "invalid_input", "stream_format",
         "stream_format must be one of audio, sse"),
        ({"input": "Oi", "voice": "v", "instructions": "Speak cheerfully"}, "invalid_input", "instructions",
         "instructions is not supported"),
        ({"input": "Oi", "voice": "v", "temprature": 0.5}, "unknown_field", "temprature",
         "unknown field(s): 'temprature'; accepted fields: model, input, voice"),
        ({"input": "Oi", "voice": "v", "language": "xx"}, "unsupported_language", "language", "language 'xx'"),
        ({"input": "Oi", "voice": "v", "seed": 1.5}, "invalid_type", "seed", "seed must be an integer"),
        ({"input": "Oi", "voice": "v", "model": 4}, "invalid_type", "model", "model must be a string"),
        (["Oi"], "invalid_type", "body", "the request body must be a JSON object, got an array"),
    ],
)  # fmt: skip
def test_each_bad_field_is_named_with_its_rule(body, code, field, message):
    error = refusal(body)
    assert (error.error_code, error.field) == (code, field)
    assert str(error).startswith(message), str(error)


def test_empty_instructions_are_accepted():
    assert call({"input": "Oi", "voice": "v", "instructions": ""}).request.gen_text == "Oi"


# ---------------------------------------------------------------------------------------------- the status table


def _project_errors():
    """Every error class of the project that carries an error_code (storage, batching, validation, config)."""
    for module in (storage.errors, batching.errors):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Exception) and hasattr(value, "error_code"):
                yield value


def test_every_project_error_code_has_a_deliberate_status():
    codes = {cls.error_code for cls in _project_errors()}
    codes |= set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", Path("server/validation.py").read_text().split(
        "Error codes (stable, part of the API):")[1].split('"""')[0]))  # fmt: skip
    unmapped = sorted(codes - set(STATUS_BY_CODE) - {"storage_error", "engine_error", "storage_not_configured",
                                                      "local_storage_error"})  # fmt: skip
    assert unmapped == [], f"codes without a status in server.openai_api.STATUS_BY_CODE: {unmapped}"


@pytest.mark.parametrize(
    ("exc", "status", "kind", "code"),
    [
        (ValidationError("speed must be ...", error_code="out_of_range", field="speed"), 400, "invalid_request_error",
         "out_of_range"),
        (storage.errors.RefAudioNotFoundError("reference audio not found: gs://b/v.wav"), 404,
         "invalid_request_error", "ref_audio_not_found"),
        (storage.errors.InvalidAudioError("not audio"), 400, "invalid_request_error", "invalid_audio"),
        (storage.errors.StorageUnavailableError("GCS kept failing"), 503, "server_error", "storage_unavailable"),
        (storage.errors.StorageRequestError("GCS said 409"), 502, "server_error", "storage_request_rejected"),
        (batching.errors.JobTimeoutError("over JOB_TIMEOUT_S"), 503, "server_error", "job_timeout"),
        (batching.errors.OutOfMemoryError("too big"), 503, "server_error", "out_of_memory"),
        (storage.errors.LocalStorageError("disk full"), 500, "server_error", "local_storage_error"),
        (ApiError("invalid_api_key", "no key"), 401, "authentication_error", "invalid_api_key"),
        (ApiError("over_capacity", "busy", retryable=True), 429, "rate_limit_error", "over_capacity"),
        (ApiError("request_too_large", "big"), 413, "invalid_request_error", "request_too_large"),
        (ApiError("worker_starting", "loading", retryable=True), 503, "server_error", "worker_starting"),
    ],
)  # fmt: skip
def test_errors_become_openais_body_with_the_tables_status(exc, status, kind, code):
    got_status, body = error_body(exc)
    assert got_status == status
    assert body["error"]["type"] == kind and body["error"]["code"] == code
    assert body["error"]["message"].startswith(f"[{code}") and str(exc) in body["error"]["message"]


def test_unknown_codes_and_bugs():
    assert status_for("something_new") == 500 and status_for("something_new", retryable=True) == 503
    status, body = error_body(KeyError("Bearer sk-secret-token"))  # a bug: its text never reaches the caller
    assert status == 500 and body["error"]["code"] == "internal_error" and "secret" not in str(body)
    assert body["error"]["param"] is None


# ---------------------------------------------------------------------------------------------- formats

SR = 24000


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


async def streamed(fmt: str, wav: np.ndarray, piece: int) -> list[bytes]:
    encoder = StreamEncoder(fmt, SR)
    pieces = [await encoder.feed(wav[i: i + piece]) for i in range(0, len(wav), piece)]
    return [*pieces, await encoder.finish()]


@pytest.mark.parametrize("fmt", ["pcm", "wav", "opus"])
async def test_streamed_formats_decode_to_the_whole_audio(fmt):
    wav = tone(2.3)
    pieces = await streamed(fmt, wav, 6000)
    body = b"".join(pieces)
    if fmt == "pcm":
        np.testing.assert_allclose(np.frombuffer(body, "<i2") / 32767.0, wav, atol=1 / 32767)
        return
    audio, sr = sf.read(io.BytesIO(body), dtype="float32")
    assert sr == SR and len(audio) == len(wav)
    if fmt == "wav":
        assert struct.unpack("<I", body[4:8])[0] == 0xFFFFFFFF and struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF
        np.testing.assert_allclose(audio, wav, atol=1 / 32767)
    else:  # Opus is lossy: the same length, and a tone that still correlates with the original
        assert np.corrcoef(audio[2400:], wav[2400:])[0, 1] > 0.9
        assert sum(1 for p in pieces[:-1] if p) >= 2  # pages left before the end: it really streams


async def test_a_streamed_wav_of_no_audio_is_still_a_header():
    encoder = StreamEncoder("wav", SR)
    assert len(await encoder.finish()) == 44


def test_only_pcm_wav_and_opus_stream():
    assert sorted(name for name, fmt in FORMATS.items() if fmt.streamed) == ["opus", "pcm", "wav"]
    assert set(FORMATS) == set(RESPONSE_FORMATS)
    with pytest.raises(ValueError, match="mp3 is not a streamed format"):
        StreamEncoder("mp3", SR)


@pytest.mark.parametrize(("fmt", "slack_s"), [("mp3", 0.0), ("flac", 0.0), ("wav", 0.0), ("opus", 0.0),
                                              ("aac", 0.1)])  # fmt: skip
def test_whole_formats_decode_to_the_duration(fmt, slack_s):
    wav = tone(1.7)
    data = encode_whole(wav, SR, fmt)
    if fmt == "aac":  # ADTS: libsndfile has no AAC; FFmpeg (torchcodec) decodes it, priming samples included
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(data).get_all_samples()
        assert data[:2] in (b"\xff\xf1", b"\xff\xf9")  # an ADTS sync word
        duration = samples.data.shape[-1] / samples.sample_rate
    else:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32")
        duration = len(audio) / sr
    assert 1.7 - 1e-3 <= duration <= 1.7 + slack_s + 1e-3, (fmt, duration)
