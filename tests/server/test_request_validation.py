"""server.validation: the job input contract at the edge, and the one place errors become job outputs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching.errors import BatchError, TextTooLongError
from batching.languages import SUPPORTED_LANGUAGES
from server.validation import (
    KNOWN_FIELDS,
    MAX_SEED,
    TTSRequest,
    ValidationError,
    error_output,
    redact,
    validate_request,
)

REPO = Path(__file__).resolve().parents[2]
STABLE_CODES = {
    "missing_field", "invalid_type", "out_of_range", "unknown_field", "unsupported_language", "text_too_long",
    "invalid_voice_id", "invalid_input",
}  # fmt: skip

BASE = {"gen_text": "Olá, mundo!", "ref_audio_url": "gs://bucket/ref.wav", "voice_id": "maria_news"}


def rejected(job_input, **limits) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_request(job_input, **limits)
    assert info.value.error_code in STABLE_CODES
    return info.value


def test_the_seed_example_payload_is_accepted():
    payload = json.loads((REPO / "test_input.json").read_text(encoding="utf-8"))
    request = validate_request(payload["input"])
    assert request == TTSRequest(
        gen_text="Olá! Este é um exemplo de síntese de voz usando XTTS V2.",
        ref_audio_url="gs://seu-bucket/referencias/voz_joao.wav",
        voice_id="joao_formal",
        language="pt",
        temperature=0.7,
        speed=1.0,
        top_k=50,
        top_p=0.85,
    )
    assert request.parameters() == {"temperature": 0.7, "speed": 1.0, "top_k": 50, "top_p": 0.85}


def test_defaults_and_normalization():
    request = validate_request({**BASE, "gen_text": "  texto  ", "language": "ZH-CN", "output_format": "FLAC"})
    assert (request.gen_text, request.language, request.output_format) == ("texto", "zh-cn", "flac")
    assert (request.temperature, request.speed, request.top_k, request.top_p) == (0.7, 1.0, 50, 0.85)
    assert (request.repetition_penalty, request.seed) == (5.0, None)
    defaults = validate_request(BASE, default_language="en", default_output_format="ogg")
    assert (defaults.language, defaults.output_format) == ("en", "ogg")


def test_request_is_frozen():
    request = validate_request(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.gen_text = "other"


def test_explicit_null_means_default():
    nulls = {name: None for name in ("language", "temperature", "speed", "top_k", "top_p", "seed", "output_format")}
    assert validate_request({**BASE, **nulls}) == validate_request(BASE)


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_every_supported_language(language):
    assert validate_request({**BASE, "language": language.upper()}).language == language


@pytest.mark.parametrize(
    ("change", "code", "field", "words"),
    [
        ({"gen_text": None}, "missing_field", "gen_text", "gen_text is required"),
        ({"gen_text": 5}, "invalid_type", "gen_text", "gen_text must be a string, got an integer"),
        ({"gen_text": "   "}, "invalid_input", "gen_text", "gen_text must not be empty"),
        ({"ref_audio_url": ""}, "invalid_input", "ref_audio_url", "ref_audio_url must not be empty"),
        ({"ref_audio_url": ["gs://a"]}, "invalid_type", "ref_audio_url", "got an array"),
        ({"voice_id": "../etc"}, "invalid_voice_id", "voice_id", "voice_id must be 1 to 128 characters"),
        ({"voice_id": ".."}, "invalid_voice_id", "voice_id", "starting with a letter or digit, got '..'"),
        ({"voice_id": ".x"}, "invalid_voice_id", "voice_id", "starting with a letter or digit, got '.x'"),
        ({"voice_id": "a" * 129}, "invalid_voice_id", "voice_id", "voice_id must be"),
        ({"voice_id": "voz joão"}, "invalid_voice_id", "voice_id", "voice_id must be"),
        ({"voice_id": 7}, "invalid_type", "voice_id", "voice_id must be a string"),
        ({"language": "pt-BR"}, "unsupported_language", "language", "language 'pt-BR' is not supported"),
        ({"language": 1}, "invalid_type", "language", "language must be a string"),
        ({"temperature": 0.05}, "out_of_range", "temperature", "temperature must be >= 0.1 and <= 1"),
        ({"temperature": True}, "invalid_type", "temperature", "temperature must be a number, got a boolean"),
        ({"temperature": "0.7"}, "invalid_type", "temperature", "got a string"),
        ({"temperature": math.nan}, "out_of_range", "temperature", "finite"),
        ({"speed": math.inf}, "out_of_range", "speed", "finite"),
        ({"speed": 2.5}, "out_of_range", "speed", "speed must be >= 0.5 and <= 2"),
        ({"top_k": 0}, "out_of_range", "top_k", "top_k must be an integer from 1"),
        ({"top_k": 1.5}, "invalid_type", "top_k", "top_k must be an integer, got 1.5"),
        ({"top_k": False}, "invalid_type", "top_k", "got a boolean"),
        ({"top_p": 0}, "out_of_range", "top_p", "top_p must be > 0 and <= 1"),
        ({"top_p": 1.01}, "out_of_range", "top_p", "top_p must be > 0 and <= 1"),
        ({"repetition_penalty": 0.9}, "out_of_range", "repetition_penalty", ">= 1 and <= 20"),
        ({"seed": -1}, "out_of_range", "seed", "seed must be an integer from 0 to"),
        ({"seed": 2**63}, "out_of_range", "seed", "seed must be an integer from 0 to"),
        ({"seed": 3.0}, "invalid_type", "seed", "seed must be an integer, got 3.0"),
        ({"output_format": "aac"}, "invalid_input", "output_format", "wav, flac, ogg, mp3"),
        ({"temprature": 0.5}, "unknown_field", "temprature", "unknown field(s) in input: 'temprature'"),
    ],
)
def test_each_rule_has_its_code_and_a_message_naming_the_field(change, code, field, words):
    error = rejected({**BASE, **change})
    assert (error.error_code, error.field) == (code, field)
    assert words in str(error)


def test_required_fields_missing():
    for name in ("gen_text", "ref_audio_url", "voice_id"):
        job_input = {k: v for k, v in BASE.items() if k != name}
        error = rejected(job_input)
        assert (error.error_code, error.field, str(error)) == ("missing_field", name, f"{name} is required")


@pytest.mark.parametrize("job_input", [None, [], "text", 3, True])
def test_input_must_be_an_object(job_input):
    assert rejected(job_input).field == "input"


def test_text_length_limit_counts_characters_after_stripping():
    assert validate_request({**BASE, "gen_text": " " + "é" * 10 + " "}, max_text_chars=10).gen_text == "é" * 10
    error = rejected({**BASE, "gen_text": "x" * 11}, max_text_chars=10)
    assert error.error_code == "text_too_long" and "11 characters" in str(error) and "10" in str(error)


def test_integral_float_top_k_is_an_integer_and_bounds_are_inclusive():
    request = validate_request(
        {**BASE, "top_k": 50.0, "temperature": 0.1, "speed": 2, "top_p": 1, "repetition_penalty": 20, "seed": MAX_SEED}
    )
    assert request.top_k == 50 and isinstance(request.top_k, int)
    assert (request.temperature, request.speed, request.top_p, request.repetition_penalty) == (0.1, 2.0, 1.0, 20.0)
    assert isinstance(request.speed, float) and request.seed == MAX_SEED


def test_huge_integers_are_out_of_range_not_crashes():
    assert rejected({**BASE, "temperature": 10**400}).error_code == "out_of_range"
    assert rejected({**BASE, "top_k": 10**5000}).error_code == "out_of_range"


# ------------------------------------------------------------------ property-based: never another exception

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
field_values = {
    "gen_text": st.text(max_size=40) | json_values,
    "ref_audio_url": st.text(max_size=20) | json_values,
    "voice_id": st.from_regex(r"[A-Za-z0-9._-]{0,130}", fullmatch=True) | json_values,
    "language": st.sampled_from([*SUPPORTED_LANGUAGES, "PT", "zh_CN", "xx", ""]) | json_values,
    "temperature": st.floats() | st.integers(-5, 5) | json_values,
    "speed": st.floats() | json_values,
    "top_k": st.integers() | st.floats() | json_values,
    "top_p": st.floats() | json_values,
    "repetition_penalty": st.floats() | json_values,
    "seed": st.integers() | json_values,
    "output_format": st.sampled_from(["wav", "FLAC", "ogg", "mp3", "aac"]) | json_values,
}
inputs = st.fixed_dictionaries({}, optional=field_values) | st.dictionaries(
    st.sampled_from(sorted(KNOWN_FIELDS | {"bogus", ""})), json_values, max_size=12
) | json_values  # fmt: skip


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs)
def test_any_json_like_input_gives_a_request_or_a_validation_error(job_input):
    try:
        request = validate_request(job_input, max_text_chars=30)
    except ValidationError as error:
        assert error.error_code in STABLE_CODES
        assert str(error)
        output = error_output(error)
        assert output["error_code"] == error.error_code and "retryable" not in output
        json.dumps(output)  # the output is always JSON-serializable
    else:
        assert isinstance(request, TTSRequest)
        assert 0 < len(request.gen_text) <= 30 and request.language in SUPPORTED_LANGUAGES
        assert 0.1 <= request.temperature <= 1.0 and 0.5 <= request.speed <= 2.0
        assert isinstance(request.top_k, int) and not isinstance(request.top_k, bool) and request.top_k >= 1
        assert 0 < request.top_p <= 1 and 1 <= request.repetition_penalty <= 20
        assert request.seed is None or (type(request.seed) is int and 0 <= request.seed <= MAX_SEED)
        assert request.output_format in ("wav", "flac", "ogg", "mp3")


@settings(max_examples=200, deadline=None, database=None)
@given(st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items() if k not in BASE}))
def test_valid_required_fields_with_any_optionals(optionals):
    try:
        request = validate_request({**BASE, **optionals})
    except ValidationError as error:
        assert error.field in optionals  # a failure always blames a field that was sent
    else:
        assert request.voice_id == BASE["voice_id"]


# ------------------------------------------------------------------ errors to outputs


def test_error_output_of_project_errors():
    assert error_output(ValidationError("gen_text is required", error_code="missing_field")) == {
        "error": "[missing_field] gen_text is required",
        "error_code": "missing_field",
    }
    assert error_output(TextTooLongError("too long")) == {
        "error": "[text_too_long] too long", "error_code": "text_too_long",
    }  # fmt: skip
    assert error_output(BatchError("batch failed")) == {
        "error": "[generation_failed, retryable] batch failed", "error_code": "generation_failed", "retryable": True,
    }  # fmt: skip


def test_error_output_of_any_object_with_an_error_code():
    class StorageDown(Exception):
        error_code = "storage_unavailable"
        retryable = True

    assert error_output(StorageDown("GCS answered 503")) == {
        "error": "[storage_unavailable, retryable] GCS answered 503", "error_code": "storage_unavailable",
        "retryable": True,
    }  # fmt: skip


def test_unexpected_errors_give_a_generic_message_without_details():
    output = error_output(RuntimeError("https://x/y?X-Goog-Signature=abc123 password=hunter2"))
    assert output == {
        "error": "[internal_error] internal error (RuntimeError); see the worker's log", "error_code": "internal_error"
    }


def test_messages_are_redacted_of_signatures_and_tokens():
    class Leaky(Exception):
        error_code = "download_failed"

    url = (
        "https://storage.googleapis.com/b/o.wav"
        "?X-Goog-Algorithm=GOOG4&X-Goog-Signature=deadbeef&X-Goog-Credential=sa%40p"
    )
    output = error_output(Leaky(f"could not fetch {url} (Authorization: Bearer ya29.secret-token)"))
    assert "deadbeef" not in output["error"] and "sa%40p" not in output["error"] and "ya29" not in output["error"]
    assert "X-Goog-Algorithm=GOOG4" in output["error"] and "X-Goog-Signature=[REDACTED]" in output["error"]
    assert redact("plain message") == "plain message"
