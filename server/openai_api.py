"""OpenAI's speech API on this worker's rules (SERVER_MODE=http): a POST /v1/audio/speech body becomes the seed's job
input, checked by `server.validation.validate_request` (so the error codes and messages are the queue worker's);
and every error becomes an HTTP status and OpenAI's error body, from ONE table (`STATUS_BY_CODE`).

Request body (JSON):

    model            any string, or absent: every name ("xtts-v2", "tts-1", "tts-1-hd", ...) is the one model
    input            -> gen_text (required; MAX_TEXT_CHARS)
    voice            -> voice_id: a voice id, or OpenAI's custom-voice object {"id": "..."}. Its reference audio is
                     VOICE_REF_URL_TEMPLATE with `{voice}` replaced, read through the same URL allow-lists and
                     reference cache as a queue job's ref_audio_url
    response_format  mp3 (OpenAI's default) | opus | aac | flac | wav | pcm (storage.audio.OUTPUT_FORMATS)
    speed            -> speed; OpenAI allows 0.25-4.0, XTTS-v2 0.5-2.0: this server's range applies, and its error
                     says so
    instructions     refused unless empty: XTTS-v2 takes its style from the reference audio and cannot follow
                     instructions, and silently ignoring them would return something else than was asked for
    stream_format    audio (default: the body is the audio) | sse (server-sent events, see server.http_server)
  extras (the OpenAI client sends them with extra_body=...):
    language, temperature, top_k, top_p, repetition_penalty, seed: as in a queue job
    ref_audio_url    the reference audio's URL: overrides VOICE_REF_URL_TEMPLATE for this request (refused with
                     400 ref_audio_forbidden under HTTP_REF_AUDIO_URL=off, unless it is the voice's own)

Unknown fields are refused (unknown_field), as in a queue job. A message that names a field names it as the caller
sent it (`input`, `voice`), not by the seed's name; OpenAI's `param` holds that name.

Errors (`error_body`): `{"error": {"message": "[code] text", "type", "param", "code"}}`, the message being the
queue worker's error string (server.errors.format_error). Statuses:

    400  the request's content: missing_field, invalid_type, out_of_range, unknown_field, unsupported_language,
         text_too_long, empty_text, untokenizable_text, invalid_voice_id, invalid_input, invalid_json,
         invalid_ref_audio_url, invalid_object_name, ref_audio_forbidden, ref_audio_too_large, invalid_audio,
         unsupported_output_format
    401  invalid_api_key (API_KEY set, and the request has no or another `Authorization: Bearer`)
    404  ref_audio_not_found (an unknown voice: its reference object does not exist), not_found (no such route)
    405  method_not_allowed
    408  request_timeout (the body did not arrive within HTTP_READ_TIMEOUT_S)
    413  request_too_large (a body over MAX_BODY_BYTES)
    429  over_capacity (MAX_CONCURRENCY requests in flight), with Retry-After
    502  storage_request_rejected (GCS refused a request for a reason of its own)
    503  worker_starting (model loading), worker_shutting_down (SIGTERM, draining), storage_unavailable,
         job_timeout, generation_failed, out_of_memory, fatal_engine_error, model_not_loaded,
         too_many_connections (HTTP_MAX_CONNECTIONS open; answered before the request is read): retry, possibly
         on another worker
    500  anything else (internal_error, local_storage_error, ...); an unknown retryable code is 503
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.config import VOICE_PLACEHOLDER
from server.validation import (
    TTSRequest, ValidationError, describe_value, error_output, short_value, validate_request,
)  # fmt: skip
from storage.audio import RESPONSE_FORMATS
from storage.errors import InvalidVoiceIdError
from storage.urls import validate_voice_id

OPENAI_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format")
EXTRA_FIELDS = ("language", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ref_audio_url")
STREAM_FORMATS = ("audio", "sse")
REF_FORBIDDEN = ("ref_audio_url is not accepted by this server (HTTP_REF_AUDIO_URL=off): name a voice, whose "
                 "reference the server finds itself (VOICE_REF_URL_TEMPLATE)")
DEFAULT_RESPONSE_FORMAT = "mp3"  # OpenAI's
OPENAI_SPEED_RANGE = "0.25 to 4.0"
# The seed's names, and the names a caller of this API knows them by.
_OPENAI_NAMES = {"gen_text": "input", "voice_id": "voice"}

STATUS_BY_CODE: dict[str, int] = {
    **dict.fromkeys((
        "missing_field", "invalid_type", "out_of_range", "unknown_field", "unsupported_language", "text_too_long",
        "empty_text", "untokenizable_text", "invalid_voice_id", "invalid_input", "invalid_json",
        "invalid_ref_audio_url", "invalid_object_name", "ref_audio_forbidden", "ref_audio_too_large",
        "invalid_audio", "unsupported_output_format",
    ), 400),  # fmt: skip
    "invalid_api_key": 401,
    "ref_audio_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "request_too_large": 413,
    "over_capacity": 429,
    "storage_request_rejected": 502,
    **dict.fromkeys((
        "worker_starting", "worker_shutting_down", "storage_unavailable", "job_timeout", "generation_failed",
        "out_of_memory", "fatal_engine_error", "model_not_loaded", "too_many_connections",
    ), 503),  # fmt: skip
    "internal_error": 500,
}
_TYPE_BY_STATUS = {401: "authentication_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A refusal of the HTTP layer itself (key, capacity, state, body): an error code, its message, and the
    headers to send with it (Retry-After)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.error_code = code
        self.retryable = retryable
        self.headers = dict(headers or {})


def status_for(code: str, retryable: bool = False) -> int:
    return STATUS_BY_CODE.get(code, 503 if retryable else 500)


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error body) for any exception; the message is `error_output`'s, so a non-project
    exception shows only a generic text (its details stay in the log)."""
    output = error_output(exc)
    return error_body_from_output(output, param=getattr(exc, "field", None))


def error_body_from_output(output: Mapping[str, Any], *, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error body) for a handler's error output (`{"error", "error_code"[, "retryable"]}`)."""
    code = output["error_code"]
    status = status_for(code, output.get("retryable") is True)
    kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": output["error"], "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class SpeechCall:
    """A checked POST /v1/audio/speech: the job's request and how to answer it."""

    request: TTSRequest
    response_format: str
    stream_format: str
    model: str


def speech_call(
    body: Any, *, max_text_chars: int, default_language: str, voice_template: str | None,
    allow_ref_audio_url: bool = True,
) -> SpeechCall:  # fmt: skip
    """Check OpenAI's request body and map it onto the seed's input; ValidationError (and nothing else) when bad."""
    if not isinstance(body, Mapping):
        raise ValidationError(f"the request body must be a JSON object, got {describe_value(body)}",
                              error_code="invalid_type", field="body")  # fmt: skip
    accepted = OPENAI_FIELDS + EXTRA_FIELDS
    unknown = sorted(str(key) for key in body if key not in accepted)
    if unknown:
        shown = ", ".join(short_value(key) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValidationError(f"unknown field(s): {shown}; accepted fields: {', '.join(accepted)}",
                              error_code="unknown_field", field=unknown[0])  # fmt: skip
    model = _optional_string(body, "model") or "xtts-v2"
    instructions = _optional_string(body, "instructions")
    if instructions and instructions.strip():
        raise ValidationError(
            "instructions is not supported: XTTS-v2 takes the voice's style from its reference audio and cannot "
            "follow instructions; send the request without it", error_code="invalid_input", field="instructions",
        )  # fmt: skip
    response_format = _choice(body, "response_format", RESPONSE_FORMATS, DEFAULT_RESPONSE_FORMAT)
    stream_format = _choice(body, "stream_format", STREAM_FORMATS, "audio")
    voice = _voice(body)
    ref_audio_url = voice_reference(voice, body.get("ref_audio_url"), template=voice_template,
                                    allow_override=allow_ref_audio_url)  # fmt: skip
    if ref_audio_url is None:
        if voice_template is None:
            raise ValidationError(
                f"ref_audio_url is required: this server has no VOICE_REF_URL_TEMPLATE to find voice {voice!r}'s "
                "reference audio; send its URL as ref_audio_url (the OpenAI client: extra_body={\"ref_audio_url\": "
                "...})", error_code="missing_field", field="ref_audio_url",
            )  # fmt: skip
    job_input = {
        "gen_text": body.get("input"), "ref_audio_url": ref_audio_url, "voice_id": voice, "speed": body.get("speed"),
        **{name: body[name] for name in EXTRA_FIELDS if name != "ref_audio_url" and name in body},
    }  # fmt: skip
    try:
        request = validate_request(job_input, max_text_chars=max_text_chars, default_language=default_language)
    except ValidationError as exc:
        raise _in_openai_terms(exc) from None
    # The response's format, for the job's log line (nothing is stored, so the seed's output_format plays no part).
    request = dataclasses.replace(request, output_format=response_format)
    return SpeechCall(request, response_format, stream_format, model)


def voice_reference(voice: str, given: Any, *, template: str | None, allow_override: bool) -> Any:
    """The reference URL a request of `voice` uses, for both routes: its own `ref_audio_url` (`given`), or the
    voice's from VOICE_REF_URL_TEMPLATE when it names none (None when there is no template either). With
    HTTP_REF_AUDIO_URL=off (`allow_override` False), a `given` other than the voice's own is refused."""
    own = template.replace(VOICE_PLACEHOLDER, voice) if template is not None else None
    if given is None:
        return own
    if not allow_override and given != own:
        raise ValidationError(REF_FORBIDDEN, error_code="ref_audio_forbidden", field="ref_audio_url")
    return given


def _in_openai_terms(exc: ValidationError) -> ValidationError:
    """The same error, naming the field as this API's caller sent it; a speed out of range says whose range."""
    field = exc.field or ""
    message = str(exc)
    name = _OPENAI_NAMES.get(field)
    if name and message.startswith(field):
        message = name + message[len(field):]
    if field == "speed" and exc.error_code == "out_of_range":
        message += f" (XTTS-v2's range on this server; OpenAI's API allows {OPENAI_SPEED_RANGE})"
    return ValidationError(message, error_code=exc.error_code, field=name or exc.field)


def _optional_string(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {describe_value(value)}", error_code="invalid_type",
                              field=name)  # fmt: skip
    return value


def _choice(body: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _optional_string(body, name)
    if value is None:
        return default
    canonical = value.strip().lower()
    if canonical not in choices:
        raise ValidationError(f"{name} must be one of {', '.join(choices)}, got {short_value(value)}",
                              error_code="invalid_input", field=name)  # fmt: skip
    return canonical


def _voice(body: Mapping[str, Any]) -> str:
    value = body.get("voice")
    if isinstance(value, Mapping):  # OpenAI's custom voice: {"id": "voice_1234"}
        value = value.get("id")
    if value is None:
        raise ValidationError("voice is required: a voice id", error_code="missing_field", field="voice")
    if not isinstance(value, str):
        raise ValidationError(f"voice must be a string (or an object with an id), got {describe_value(value)}",
                              error_code="invalid_type", field="voice")  # fmt: skip
    try:
        return validate_voice_id(value)
    except InvalidVoiceIdError as exc:
        raise _in_openai_terms(ValidationError(str(exc), error_code=exc.error_code, field="voice_id")) from None
