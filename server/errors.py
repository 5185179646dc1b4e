r"""The error string of a failed job, in one stable form that survives any transport.

RunPod keeps only a failed job's `error` string in some places: its API answers a FAILED job with `error` alone,
the local test API (`--rp_serve_api`) drops `output` on FAILED, and a streamed error becomes `{"error": str}`. So
the string itself carries the stable code, and whether a retry may succeed:

    [unsupported_language] language 'xx' is not supported; supported languages: pt, en, ...
    [storage_unavailable, retryable] GCS kept failing for gs://bucket/voices/a.wav: ...

The job's `output` (where the transport keeps it) still has `error_code` and `retryable`. This module has no
dependencies: a client may import it, or copy `ERROR_PATTERN` (documented in the README):

    ^\[(?P<code>[a-z][a-z0-9_]*)(?P<retryable>, retryable)?\] (?P<text>.*)$     (dot matches newlines)
"""

from __future__ import annotations

import re

ERROR_PATTERN = re.compile(r"\[(?P<code>[a-z][a-z0-9_]*)(?P<retryable>, retryable)?\] (?P<text>.*)", re.DOTALL)
CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def format_error(code: str, text: str, *, retryable: bool = False) -> str:
    """`[code] text`, or `[code, retryable] text`. `code` must be lower-case snake case (`CODE_PATTERN`)."""
    if not CODE_PATTERN.fullmatch(code):
        raise ValueError(f"an error code is lower-case snake case, got {code!r}")
    return f"[{code}{', retryable' if retryable else ''}] {text}"


def parse_error(message: object) -> tuple[str | None, bool, str]:
    """`(code, retryable, text)` of a job's `error` string.

    A message not in this form (an older worker, or one the RunPod SDK wrote itself, such as a handler's
    traceback or "Job ID not found") gives `(None, False, message)`: no code, and no promise a retry helps.
    """
    if message is None:
        return None, False, ""
    text = message if isinstance(message, str) else str(message)
    match = ERROR_PATTERN.fullmatch(text)
    if match is None:
        return None, False, text
    return match["code"], match["retryable"] is not None, match["text"]
