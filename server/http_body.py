"""A request's body, within limits a caller cannot push into a 500, and errors in OpenAI's shape (SERVER_MODE=http).

MAX_BODY_BYTES (413 request_too_large), HTTP_READ_TIMEOUT_S (408 request_timeout), JSON only (400 invalid_json),
nesting no deeper than MAX_JSON_DEPTH and no number longer than MAX_JSON_NUMBER_CHARS (400 invalid_json).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

from server.openai_api import ApiError, error_body

MAX_BODY_BYTES = 1 << 20  # a request body; MAX_TEXT_CHARS of text fits many times over
MAX_JSON_DEPTH = 32  # a request body nests objects and arrays at most this deep (OpenAI's body: 2)
MAX_JSON_NUMBER_CHARS = 100  # and writes no number longer than this (Python's int() refuses 4,300 digits)


async def read_json_body(request: web.Request, timeout_s: float) -> object:
    """The request's body, read within `timeout_s` (HTTP_READ_TIMEOUT_S) and MAX_BODY_BYTES, parsed
    (parse_json_body)."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes") from None
    except TimeoutError:
        raise ApiError("request_timeout", f"the request body did not arrive within "
                       f"{timeout_s:g} s (HTTP_READ_TIMEOUT_S)") from None  # fmt: skip
    return parse_json_body(raw)


class _NumberTooLong(ValueError):
    pass


def parse_json_body(raw: bytes) -> object:
    """The request body as JSON, within limits a caller cannot push into a 500: no number longer than
    MAX_JSON_NUMBER_CHARS (checked as the parser meets it, before int() would refuse 4,300 digits), nesting no
    deeper than MAX_JSON_DEPTH (the parser's own recursion guard stops a deeper one early). ApiError invalid_json."""

    def number(text: str, convert: Callable[[str], object]) -> object:
        if len(text) > MAX_JSON_NUMBER_CHARS:
            raise _NumberTooLong
        return convert(text)

    try:
        value = json.loads(raw, parse_int=lambda t: number(t, int), parse_float=lambda t: number(t, float))
    except _NumberTooLong:
        raise ApiError("invalid_json", f"the request body has a number longer than {MAX_JSON_NUMBER_CHARS} "
                       "characters") from None  # fmt: skip
    except RecursionError:
        value = None  # deeper than the interpreter's recursion limit, so far deeper than MAX_JSON_DEPTH
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError("invalid_json", f"the request body is not valid JSON ({exc})") from None
    if value is None or _depth(value) > MAX_JSON_DEPTH:
        raise ApiError("invalid_json", f"the request body nests objects or arrays deeper than {MAX_JSON_DEPTH} "
                       "levels") from None  # fmt: skip
    return value


def _depth(value: object) -> int:
    """How deep objects and arrays nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def from_aiohttp(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError("not_found", "no such route: POST /v1/audio/speech, POST /tts and GET /ping are served")
    if exc.status == 405:
        return ApiError("method_not_allowed", f"method not allowed: {exc.reason}")
    if exc.status == 413:
        return ApiError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return ApiError("invalid_input", exc.reason or "bad request")


def error_response(exc: BaseException) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)
