"""The edge: a RunPod job's `input` becomes a frozen, typed `TTSRequest`, or a `ValidationError`; and any error
with an `error_code` becomes the job's output in exactly one place, `error_output` (its `error` string starts with
`[code]` or `[code, retryable]`, parsed back by `server.errors.parse_error`).

Input contract (the seed's payload, checked strictly):

    gen_text            str, required; stripped; not empty; at most MAX_TEXT_CHARS characters
    ref_audio_url       str, required; not empty (which URLs are allowed is storage's decision)
    voice_id            str, required; 1..128 letters, digits, '.', '_' or '-', starting with a letter or digit
                        (storage.urls.validate_voice_id: the one definition, message included)
    language            str, default DEFAULT_LANGUAGE; one of batching.languages.SUPPORTED_LANGUAGES, any case
    temperature         number 0.1..1.0, default 0.7 (every default here is batching.params.SAMPLING_DEFAULTS)
    speed               number 0.5..2.0, default 1.0
    top_k               integer >= 1 (at most 2**31-1), default 50
    top_p               number, 0 < top_p <= 1, default 0.85
    repetition_penalty  number 1.0..20.0, default 5.0
    seed                integer 0..2**63-1, or null (random), default null
    output_format       wav | flac | ogg | mp3 (any case; storage.audio.SUPPORTED_OUTPUT_FORMATS), default
                        DEFAULT_OUTPUT_FORMAT

Decisions:
- Unknown fields are errors (a typo such as `temprature` must not be silently ignored).
- Booleans are not numbers (`true` is not 1). NaN and infinities are rejected.
- An optional field sent as `null` takes its default, as if absent (JSON clients often send explicit nulls).
- `top_k` accepts an integral float (`50.0`, as Python's json writes a float) as the integer 50; `1.5` is an
  `invalid_type`. `seed` accepts only true integers: a float cannot hold every 63-bit seed exactly.

Error codes (stable, part of the API): missing_field, invalid_type, out_of_range, unknown_field,
unsupported_language, text_too_long, invalid_voice_id, invalid_input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batching.languages import SUPPORTED_LANGUAGES, normalize_language
from batching.params import SAMPLING_DEFAULTS
from server.errors import CODE_PATTERN, format_error
from storage.audio import SUPPORTED_OUTPUT_FORMATS
from storage.errors import InvalidVoiceIdError
from storage.urls import validate_voice_id

MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1

KNOWN_FIELDS = frozenset(
    {
        "gen_text", "ref_audio_url", "voice_id", "language", "temperature", "speed", "top_k", "top_p",
        "repetition_penalty", "seed", "output_format", "stream",
    }
)  # fmt: skip


class ValidationError(ValueError):
    """The job's input breaks the contract. Never retryable: the same input fails the same way."""

    retryable = False

    def __init__(self, message: str, *, error_code: str = "invalid_input", field: str | None = None):
        super().__init__(message)
        self.error_code = error_code
        self.field = field


@dataclass(frozen=True)
class TTSRequest:
    """A validated job input. Build it with `validate_request`, never by hand from untrusted data."""

    gen_text: str
    ref_audio_url: str
    voice_id: str
    language: str = "pt"
    temperature: float = SAMPLING_DEFAULTS.temperature
    speed: float = SAMPLING_DEFAULTS.speed
    top_k: int = SAMPLING_DEFAULTS.top_k
    top_p: float = SAMPLING_DEFAULTS.top_p
    repetition_penalty: float = SAMPLING_DEFAULTS.repetition_penalty
    seed: int | None = None
    output_format: str = "wav"
    stream: bool = True  # STREAMING=on: false gives only the result (ignored when the worker does not stream)

    def parameters(self) -> dict[str, Any]:
        """The `parameters` object of the seed's response."""
        return {"temperature": self.temperature, "speed": self.speed, "top_k": self.top_k, "top_p": self.top_p}


def describe_value(value: Any) -> str:
    """A short name for what the client sent, for messages (never the whole value: it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _number(
    data: Mapping[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{name} must be a number, got {describe_value(value)}", error_code="invalid_type", field=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{name} must be a finite number, got {value!r}", error_code="out_of_range", field=name)
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float is certainly out of range
        number = math.inf
    too_low = number <= low if low_open else number < low
    if too_low or number > high:
        rule = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise ValidationError(
            f"{name} must be {rule}, got {short_value(value)}", error_code="out_of_range", field=name
        )
    return number


def _integer(
    data: Mapping[str, Any], name: str, default: int | None, low: int, high: int, *, allow_float: bool
) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValidationError(f"{name} must be an integer, got a boolean", error_code="invalid_type", field=name)
    if isinstance(value, float) and allow_float and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        got = short_value(value) if isinstance(value, float) else describe_value(value)
        raise ValidationError(f"{name} must be an integer, got {got}", error_code="invalid_type", field=name)
    if value < low or value > high:
        raise ValidationError(
            f"{name} must be an integer from {low} to {high}, got {short_value(value)}",
            error_code="out_of_range",
            field=name,
        )
    return value


def short_value(value: Any) -> str:
    """The client's value as a message shows it: its repr, cut to 40 characters."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        return "a very large integer"
    return text if len(text) <= 40 else text[:37] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def _required_string(data: Mapping[str, Any], name: str) -> str:
    if name not in data or data[name] is None:
        raise ValidationError(f"{name} is required", error_code="missing_field", field=name)
    value = data[name]
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {describe_value(value)}", error_code="invalid_type", field=name)
    value = value.strip()
    if not value:
        raise ValidationError(f"{name} must not be empty", error_code="invalid_input", field=name)
    if (lone := _SURROGATE.search(value)) is not None:  # JSON's "\ud800" decodes to one; it is no text
        shown = lone.group().encode("unicode_escape").decode("ascii")
        raise ValidationError(
            f"{name} must be valid Unicode text: it has a lone surrogate ({shown}) at character {lone.start()}; "
            "send UTF-8 text (a character beyond U+FFFF as its surrogate pair in JSON)",
            error_code="invalid_input", field=name,
        )  # fmt: skip
    return value


def _voice_id(data: Mapping[str, Any]) -> str:
    value = data.get("voice_id")
    if value is None:
        raise ValidationError("voice_id is required", error_code="missing_field", field="voice_id")
    if not isinstance(value, str):
        raise ValidationError(
            f"voice_id must be a string, got {describe_value(value)}", error_code="invalid_type", field="voice_id"
        )
    try:
        return validate_voice_id(value)  # storage's rule and message: the one definition of a voice_id
    except InvalidVoiceIdError as exc:
        raise ValidationError(str(exc), error_code=exc.error_code, field="voice_id") from None


def _language(data: Mapping[str, Any], default: str) -> str:
    value = data.get("language")
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(
            f"language must be a string, got {describe_value(value)}", error_code="invalid_type", field="language"
        )
    try:
        return normalize_language(value)
    except Exception:  # batching's UnsupportedLanguageError, restated with the field name
        raise ValidationError(
            f"language {short_value(value)} is not supported; supported languages: {', '.join(SUPPORTED_LANGUAGES)}",
            error_code="unsupported_language",
            field="language",
        ) from None


def _output_format(data: Mapping[str, Any], default: str) -> str:
    value = data.get("output_format")
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValidationError(
            f"output_format must be a string, got {describe_value(value)}", error_code="invalid_type", field="output_format"
        )
    canonical = value.strip().lower()
    if canonical not in SUPPORTED_OUTPUT_FORMATS:
        raise ValidationError(
            f"output_format must be one of {', '.join(SUPPORTED_OUTPUT_FORMATS)}, got {short_value(value)}",
            error_code="invalid_input",
            field="output_format",
        )
    return canonical


def validate_request(
    job_input: Any,
    *,
    max_text_chars: int = 5000,
    default_language: str = "pt",
    default_output_format: str = "wav",
) -> TTSRequest:
    """Check a job's `input` and return a TTSRequest; raise ValidationError (and nothing else) when it is bad."""
    if job_input is None:
        raise ValidationError("input is required: a JSON object with gen_text, ref_audio_url and voice_id",
                              error_code="missing_field", field="input")  # fmt: skip
    if not isinstance(job_input, Mapping):
        raise ValidationError(
            f"input must be a JSON object, got {describe_value(job_input)}", error_code="invalid_type", field="input"
        )
    unknown = sorted(str(key) for key in job_input if key not in KNOWN_FIELDS)
    if unknown:
        shown = ", ".join(short_value(key) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValidationError(
            f"unknown field(s) in input: {shown}; accepted fields: {', '.join(sorted(KNOWN_FIELDS))}",
            error_code="unknown_field",
            field=unknown[0],
        )

    gen_text = _required_string(job_input, "gen_text")
    if len(gen_text) > max_text_chars:
        raise ValidationError(
            f"gen_text is {len(gen_text)} characters long; the limit is {max_text_chars} (MAX_TEXT_CHARS)",
            error_code="text_too_long",
            field="gen_text",
        )
    return TTSRequest(
        gen_text=gen_text,
        ref_audio_url=_required_string(job_input, "ref_audio_url"),
        voice_id=_voice_id(job_input),
        language=_language(job_input, default_language),
        temperature=_number(job_input, "temperature", SAMPLING_DEFAULTS.temperature, 0.1, 1.0),
        speed=_number(job_input, "speed", SAMPLING_DEFAULTS.speed, 0.5, 2.0),
        top_k=_integer(job_input, "top_k", SAMPLING_DEFAULTS.top_k, 1, MAX_TOP_K, allow_float=True),
        top_p=_number(job_input, "top_p", SAMPLING_DEFAULTS.top_p, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(job_input, "repetition_penalty", SAMPLING_DEFAULTS.repetition_penalty, 1.0, 20.0),
        seed=_integer(job_input, "seed", None, 0, MAX_SEED, allow_float=False),
        output_format=_output_format(job_input, default_output_format),
        stream=_boolean(job_input, "stream", True),
    )


def _boolean(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false, got {describe_value(value)}", error_code="invalid_type",
                              field=name)  # fmt: skip
    return value


# --------------------------------------------------------------------------------------------------------------
# Errors to job outputs: the ONLY place an exception becomes what the caller sees.
# --------------------------------------------------------------------------------------------------------------

# Query parameters that carry credentials (GCS V4 / V2 signed URLs, generic tokens): their values are masked in
# any message that leaves the worker or reaches a log.
_SECRET_PARAM = re.compile(
    r"(?i)\b(x-goog-signature|x-goog-credential|signature|sig|token|access_token|key|api_key|googleaccessid)=[^&\s\"']+"
)
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """Mask URL signatures, tokens and bearer credentials inside free text."""
    return _BEARER.sub("Bearer [REDACTED]", _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=[REDACTED]", text))


def error_output(exc: BaseException) -> dict[str, Any]:
    """The job output for a failure: `{"error": "[code] message", "error_code": code}`, plus `"retryable": true`
    (and `, retryable` inside the brackets) when a retry may succeed.

    The code leads the `error` string (`server.errors.format_error`; read it back with `server.errors.parse_error`)
    because RunPod and its local test API keep only that string of a failed job; `output` keeps `error_code` and
    `retryable` for transports that keep it.

    Errors of this project (validation, storage, batching) carry `error_code` and `retryable`; their message is
    meant for the caller. Anything else is a bug: the caller gets a generic message and the worker's log (written
    by whoever caught it) keeps the details, so an unexpected message can never leak a credential. So is an
    `error_code` that is not lower-case snake case: it could not be parsed back out of the string.
    """
    code = getattr(exc, "error_code", None)
    if isinstance(code, str) and CODE_PATTERN.fullmatch(code):
        message = redact(str(exc)) or type(exc).__name__
    else:
        code = "internal_error"
        message = f"internal error ({type(exc).__name__}); see the worker's log"
    retryable = getattr(exc, "retryable", False) is True
    output: dict[str, Any] = {"error": format_error(code, message, retryable=retryable), "error_code": code}
    if retryable:
        output["retryable"] = True
    return output
