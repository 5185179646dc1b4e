r"""Caller text as a log line may carry it: one line, no terminal escapes, always encodable.

A caller's text (`gen_text`, a URL, a path) reaches the log in several places. Written raw, an ESC or BEL sequence
drives the operator's terminal (log injection), a newline forges a log line, and a lone surrogate (`"\ud800"`,
which JSON allows) cannot be encoded as UTF-8, so the logging module drops the whole line ("--- Logging error
---"). `printable` shows each such character as its Python escape (`\x1b`, `\n`, `\ud800`, `\u202e`);
`EscapingFormatter` applies it to every log message the worker writes (tracebacks, the worker's own, are kept).
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, surrogates, line and paragraph separators, bidirectional overrides and isolates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control, surrogate and bidi-override character written as its escape."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages pass through `printable` (the traceback it appends is not caller text)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)
