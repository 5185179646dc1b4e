"""POST /v1/audio/speech's answer once its first audio exists (server.http_server checks the request, the handler
makes the audio): the status, then the body as the audio comes, every write under HTTP_WRITE_TIMEOUT_S.

- A streamed format (pcm, wav, opus: storage.audio.OUTPUT_FORMATS) is written as the scheduler makes the audio
  (chunked transfer); a whole format (mp3, flac, aac) once it is all made, with Content-Length and X-Audio-Duration.
- stream_format "sse": `speech.audio.delta` events carrying the same bytes, then `speech.audio.done` with usage.
- A failure after the status: an audio body is cut short (a truncated transfer, never a complete-looking file); an
  SSE body gets an error event and ends. A client that takes no byte for HTTP_WRITE_TIMEOUT_S is dropped (its
  transport closed; the handler's generator, closed on the way out, drops its rows).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from batching import SpeechResult
from batching.streaming import AudioChunk
from server.config import WorkerConfig
from server.metrics import Metrics
from server.openai_api import SpeechCall, error_body
from storage.audio import OUTPUT_FORMATS as FORMATS, StreamEncoder, encode_whole_async

log = logging.getLogger("server.http")

SSE_PIECE_BYTES = 64 * 1024  # a whole-file format's body is sent as SSE deltas of at most this many bytes
AUDIO_TOKEN_S = 1024 / 22050  # one XTTS audio token (usage.output_tokens)


class SpeechWriter:
    """Writes the answers of POST /v1/audio/speech (one per server; the request is an argument)."""

    def __init__(self, config: WorkerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics  # xtts_http_dropped_total

    async def send_stream(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
        response = web.StreamResponse(headers=_audio_headers(request_id, call, first.sample_rate))
        async with self._writing(request, request_id, response) as write:
            async for data in _AudioBody(call.response_format, first, parts):
                await write(data)
        return response

    async def send_whole(self, request, request_id, call: SpeechCall, result, parts) -> web.StreamResponse:
        """A whole format: encoded once all is made, then written under the same deadline as a stream."""
        data = await _whole_body(call, result, parts)
        response = web.StreamResponse(headers={**_audio_headers(request_id, call, result.sample_rate),
                                               "X-Audio-Duration": f"{len(result.wav) / result.sample_rate:.6f}"})
        response.content_length = len(data)
        async with self._writing(request, request_id, response) as write:
            await write(data)
        return response

    async def send_events(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": request_id})  # fmt: skip
        async with self._writing(request, request_id, response, events=True) as write:
            if FORMATS[call.response_format].streamed:
                body = _AudioBody(call.response_format, first, parts)
                async for data in body:
                    await write(_delta(data))
                result = body.result
            else:
                result = first
                data = await _whole_body(call, result, parts)
                for lo in range(0, len(data), SSE_PIECE_BYTES):
                    await write(_delta(data[lo: lo + SSE_PIECE_BYTES]))
            await write(_event({"type": "speech.audio.done", "usage": _usage(call, result.duration_s)}))
        return response

    @contextlib.asynccontextmanager
    async def _writing(self, request, request_id: str, response: web.StreamResponse, *, events: bool = False):
        """Send the status, then give the block `write(data)`: every write under HTTP_WRITE_TIMEOUT_S; the body
        ended (write_eof) when the block ends. Whatever happens after the status, nothing escapes: a client that
        went away, or stalled past the deadline, is let go (its transport closed; the handler's generator, closed on
        the way out, drops its rows); a failure of the audio cuts an audio body short (a truncated transfer, never a
        complete-looking file) or ends an SSE body with an error event."""
        await response.prepare(request)
        write = functools.partial(self._write, request, response)
        try:
            try:
                yield write
            except ConnectionError:
                return  # the client went away: nobody to tell
            except _Stalled:
                self._drop(request, request_id)
                return
            except Exception as exc:  # the status is sent already
                if not events:
                    log.warning("[%s] audio cut short after its status was sent: %s", request_id, type(exc).__name__)
                    _cut(request)
                    return
                _, error = error_body(exc)  # logged by the handler: the stream says so, and ends
                await write(_event({"type": "error", **error}))
            await asyncio.wait_for(response.write_eof(), self.config.http_write_timeout_s)
        except (ConnectionError, _Stalled, TimeoutError):
            # At the very end: all the audio was handed to the socket, and the job has counted as completed.
            log.info("[%s] the client left before the response's last bytes", request_id)
            _cut(request)

    async def _write(self, request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        """`response.write(data)`; _Stalled when the client takes none of the pending bytes for HTTP_WRITE_TIMEOUT_S.

        aiohttp's write returns once the transport's buffer is below its high-water mark, which a stalled reader
        never lets happen. Progress is the buffer shrinking (the kernel took bytes, because the client read some):
        a client reading slowly but steadily is never cut off, one that stops is, HTTP_WRITE_TIMEOUT_S later."""
        limit = self.config.http_write_timeout_s
        writing = asyncio.ensure_future(response.write(data))
        writing.add_done_callback(_retrieved)  # however this ends (our caller cancelled too), its error is seen
        loop = asyncio.get_running_loop()
        pending, progress_at = None, loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({writing}, timeout=min(1.0, limit / 4))
                if done:
                    return writing.result()
                transport = request.transport
                size = transport.get_write_buffer_size() if transport is not None else 0
                if pending is None or size < pending:
                    progress_at = loop.time()
                pending = size
                if loop.time() - progress_at >= limit:
                    raise _Stalled
        finally:
            if not writing.done():
                writing.cancel()

    def _drop(self, request: web.Request, request_id: str) -> None:
        log.warning("[%s] the client took no byte of its response for %g s (HTTP_WRITE_TIMEOUT_S): dropped",
                    request_id, self.config.http_write_timeout_s)  # fmt: skip
        if self.metrics:
            self.metrics.http_dropped.labels(reason="write_timeout").inc()
        _cut(request)


class _Stalled(Exception):
    """The client took no byte of its response for HTTP_WRITE_TIMEOUT_S."""


def _retrieved(task: asyncio.Future) -> None:
    """A cancelled write's task: its exception (the client's reset) is seen, not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _audio_headers(request_id: str, call: SpeechCall, sample_rate: int) -> dict[str, str]:
    return {"Content-Type": FORMATS[call.response_format].content_type, "X-Audio-Sample-Rate": str(sample_rate),
            "X-Request-Id": request_id}  # fmt: skip


class _AudioBody:
    """A streamed format's body, piece by piece (`async for data in body`), from `first` and the rest of `parts`
    (AudioChunks, then the SpeechResult, which is `result` once the body is done)."""

    def __init__(self, fmt: str, first, parts: AsyncIterator):
        self._encoder = StreamEncoder(fmt, first.sample_rate)
        self._first = first
        self._parts = parts
        self.result: SpeechResult | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        item = self._first
        while True:
            if isinstance(item, AudioChunk):
                data = await self._encoder.feed(item.samples)
            else:
                self.result = item
                data = await self._encoder.finish()
            if data:
                yield data
            try:
                item = await anext(self._parts)
            except StopAsyncIteration:
                return


async def _whole_body(call: SpeechCall, result: SpeechResult, parts: AsyncIterator) -> bytes:
    """A whole format's body (encoded in a thread); then the handler's generator runs to its end, which counts
    the job completed."""
    data = await encode_whole_async(result.wav, result.sample_rate, call.response_format)
    async for _ in parts:
        pass
    return data


def _delta(data: bytes) -> bytes:
    return _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _usage(call: SpeechCall, duration_s: float) -> dict[str, int]:
    input_tokens = len(call.request.gen_text)
    output_tokens = round(duration_s / AUDIO_TOKEN_S)
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}


def _cut(request: web.Request) -> None:
    """End a response whose status is sent without its last chunk: the client sees a truncated transfer."""
    if request.transport is not None:
        request.transport.close()
