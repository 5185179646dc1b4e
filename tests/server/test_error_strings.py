"""server.errors: the `[code]` / `[code, retryable]` form of a failed job's `error` string, and its parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batching.errors import BatchError, FatalEngineError
from server.errors import ERROR_PATTERN, format_error, parse_error
from server.validation import ValidationError, error_output
from storage.errors import RefAudioNotFoundError, StorageUnavailableError

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("exc", "string", "retryable"),
    [
        (ValidationError("language 'xx' is not supported", error_code="unsupported_language"),
         "[unsupported_language] language 'xx' is not supported", False),
        (StorageUnavailableError("GCS kept failing"), "[storage_unavailable, retryable] GCS kept failing", True),
        (RefAudioNotFoundError("reference audio not found: gs://b/o.wav"),
         "[ref_audio_not_found] reference audio not found: gs://b/o.wav", False),
        (BatchError("row failed"), "[generation_failed, retryable] row failed", True),
        (FatalEngineError("CUDA error"), "[fatal_engine_error, retryable] CUDA error", True),
        (KeyError("secret"), "[internal_error] internal error (KeyError); see the worker's log", False),
    ],
)  # fmt: skip
def test_error_output_leads_its_string_with_the_code_and_parses_back(exc, string, retryable):
    output = error_output(exc)
    assert output["error"] == string
    code, parsed_retryable, text = parse_error(output["error"])
    assert code == output["error_code"] and parsed_retryable is retryable
    assert output.get("retryable", False) is retryable
    assert string.endswith(text) and not text.startswith("[")


def test_an_error_code_that_is_not_snake_case_is_an_internal_error():
    class Odd(Exception):
        error_code = "Not A Code"

    assert error_output(Odd("x"))["error_code"] == "internal_error"
    with pytest.raises(ValueError):
        format_error("Bad-Code", "x")


@pytest.mark.parametrize(
    "message",
    [None, "", "Job ID not found", "[not closed", "[Upper] x", "[code]no space", "[code, maybe] x",
     '{"error_type": "<class \'KeyError\'>", "error_message": "x"}'],
)  # fmt: skip
def test_messages_in_another_form_have_no_code(message):
    code, retryable, text = parse_error(message)
    assert code is None and retryable is False and text == (message or "")


@given(
    st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True),
    st.booleans(),
    st.text(),
)
def test_format_then_parse_is_the_identity(code, retryable, text):
    assert parse_error(format_error(code, text, retryable=retryable)) == (code, retryable, text)


def test_the_readme_documents_the_pattern_the_parser_uses():
    documented = re.search(r"`(\^\\\[\(\?P<code>[^`]+)`", README)
    assert documented, "README lacks the error-string regex"
    pattern = re.compile(documented.group(1), re.DOTALL)
    for message in ("[storage_unavailable, retryable] GCS down\nsecond line", "[missing_field] gen_text is required"):
        ours, theirs = ERROR_PATTERN.fullmatch(message), pattern.match(message)
        assert theirs and theirs.groupdict() == ours.groupdict()
    assert pattern.match("Job ID not found") is None
