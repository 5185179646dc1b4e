"""SERVER_MODE=http: an OpenAI-compatible HTTP server for a RunPod load-balancing endpoint (aiohttp, uvloop), on
the same engine, scheduler, caches, storage and metrics as the queue worker (server.handler.TTSHandler).

Routes, on HOST:PORT:

    GET  /ping              RunPod's health check: 204 while the worker starts (RunPod: "initializing"), 200 once
                            the model is loaded and warm ("healthy"), 503 while it drains after SIGTERM (anything
                            else than 200 or 204 is "unhealthy": no new requests are routed to it). Never needs
                            the API key. With PORT_HEALTH other than PORT, a second listener serves /ping alone.
    POST /v1/audio/speech   OpenAI's speech API (server.openai_api: the request; storage.audio: the body)
    POST /tts               the seed's job input in, the seed's output out (a queue job's `input` and `output`)

Every work request passes, in this order: API_KEY (`Authorization: Bearer <key>`, compared in constant time;
401 invalid_api_key, also for a header that is not UTF-8), the worker's state (503 worker_starting with Retry-After while loading; 503
worker_shutting_down while draining), capacity (at most MAX_CONCURRENCY requests in flight: one more is answered
429 over_capacity at once, with `Retry-After: 1`, never queued: a load-balancing endpoint has no queue, and a
client or RunPod's balancer should try again, here or on another worker), and the body (MAX_BODY_BYTES: 413
request_too_large; not all there within HTTP_READ_TIMEOUT_S: 408 request_timeout; not JSON, nested deeper than
MAX_JSON_DEPTH or with a number longer than MAX_JSON_NUMBER_CHARS (parse_json_body): 400 invalid_json). Errors are OpenAI's error body (server.openai_api.error_body);
every answer carries `X-Request-Id`, the job id in the worker's log.

POST /v1/audio/speech answers:
- stream_format "audio" (default): the body is the audio. pcm, wav and opus are written as the scheduler makes the
  audio (chunked transfer); mp3, flac and aac once it is all made, with Content-Length and X-Audio-Duration
  (seconds). Headers: Content-Type, X-Audio-Sample-Rate.
- stream_format "sse": `text/event-stream`, events `data: {"type": "speech.audio.delta", "audio": "<base64>"}` (the
  same bytes as the audio body, in the same pieces), then `data: {"type": "speech.audio.done", "usage":
  {"input_tokens", "output_tokens", "total_tokens"}}` (input_tokens: characters of input; output_tokens: XTTS audio
  tokens, 1024 samples at 22.05 kHz each, from the duration).
- The status is sent only once the first audio exists, so every failure before it (a bad field, an unknown voice,
  a reference that is not audio, ...) is an ordinary error response. A failure after it: an audio body ends
  without its last chunk (the connection is closed: the client sees a truncated transfer, never a complete-looking
  file); an SSE body gets `data: {"type": "error", "error": {...}}` and ends.
- A client that goes away mid-stream: its handler is cancelled (aiohttp's handler_cancellation), which closes
  Scheduler.stream: its rows leave the batch at the next step. The job counts as cancelled; a client that leaves
  once all the audio is written (at the final write_eof) leaves a completed job.

Limits against hostile or broken clients (each a setting of server.config):
- Every audio write has a deadline: a client that takes no byte of its response for HTTP_WRITE_TIMEOUT_S is cut
  off (its transport closed, its rows out of the batch, its MAX_CONCURRENCY slot free), however early the audio
  was made. Meanwhile its stream pauses once STREAM_BUFFER_S of audio is unread (batching.scheduler).
- An idle keep-alive connection, or one whose request headers have not all arrived, is closed after
  HTTP_KEEPALIVE_S (aiohttp's keepalive_timeout, armed from the connection's start).
- At most HTTP_MAX_CONNECTIONS open connections on PORT (cut to fit RLIMIT_NOFILE); one more is answered
  `503 too_many_connections` with `Retry-After: 1` and closed. The listen backlog is LISTEN_BACKLOG. With
  PORT_HEALTH other than PORT, /ping's own listener has HEALTH_CONNECTIONS more, so RunPod's health check gets
  through while PORT is full.

Lifecycle (`serve`): the listeners come up first (/ping 204), then the caller's `start()` builds the handler
context in this event loop (storage check, engine loaded and warmed in a thread, scheduler) -> /ping 200. A start-up
failure raises StartupError (python -m server exits 2). SIGTERM or SIGINT: /ping 503 and new requests 503, the
requests in flight finish (each bounded by JOB_TIMEOUT_S; DRAIN_GRACE_S more for slow readers), the listeners
close, `serve` returns (exit 0).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import json
import logging
import math
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from aiohttp import web

from batching import SpeechResult
from batching.streaming import AudioChunk
from server.config import WorkerConfig
from server.handler import HandlerContext, TTSHandler
from server.metrics import Metrics
from server.openai_api import (
    ApiError, SpeechCall, error_body, error_body_from_output, speech_call, voice_reference,
)
from server.validation import ValidationError
from storage.audio import OUTPUT_FORMATS as FORMATS, StreamEncoder, encode_whole_async

log = logging.getLogger("server.http")

MAX_BODY_BYTES = 1 << 20  # a request body; MAX_TEXT_CHARS of text fits many times over
STARTING_RETRY_AFTER_S = 5
OVER_CAPACITY_RETRY_AFTER_S = 1
DRAIN_GRACE_S = 30.0  # beyond JOB_TIMEOUT_S, for clients that read a finished stream slowly
SSE_PIECE_BYTES = 64 * 1024  # a whole-file format's body is sent as SSE deltas of at most this many bytes
AUDIO_TOKEN_S = 1024 / 22050  # one XTTS audio token (usage.output_tokens)
MAX_JSON_DEPTH = 32  # a request body nests objects and arrays at most this deep (OpenAI's body: 2)
MAX_JSON_NUMBER_CHARS = 100  # and writes no number longer than this (Python's int() refuses 4,300 digits)
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (aiohttp's 128 drops SYNs under a burst)
HEALTH_CONNECTIONS = 64  # the PORT_HEALTH listener's own cap
FD_RESERVE = 64  # file descriptors kept for the model, logs, storage and the metrics endpoint
MAX_REFUSING = 64  # connections past the cap being answered 503 at once; more are reset (a flood: no fds left)
REFUSAL_LOG_EVERY_S = 10.0  # connections refused past the cap: one log line per this many seconds, with a count

STARTING, READY, DRAINING = "starting", "ready", "draining"
REQUEST_ID = web.RequestKey("request_id", str)


class StartupError(Exception):
    """The worker cannot start (storage, model, a port): `python -m server` logs it and exits 2."""


class HttpApi:
    """The routes and the admission rules; `handler` is set once the context is built (state READY)."""

    def __init__(self, config: WorkerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics  # refusals are counted here (xtts_http_refusals_total); jobs by the handler
        self.handler: TTSHandler | None = None
        self.state = STARTING
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ applications

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._middleware])
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_post("/tts", self.tts)
        return app

    def health_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/ping", self.ping)
        return app

    def ready(self, context: HandlerContext) -> None:
        self.handler = TTSHandler(context)
        self.state = READY

    def drain(self) -> None:
        self.state = DRAINING

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # ------------------------------------------------------------------ routes

    async def ping(self, request: web.Request) -> web.Response:
        if self.state == STARTING:
            return web.Response(status=204)  # a 204 has no body
        return web.json_response({"status": self.state}, status=200 if self.state == READY else 503)

    async def tts(self, request: web.Request) -> web.StreamResponse:
        async with self._admitted(request) as request_id:
            body = await self._json_body(request)
            try:
                body = self._tts_input(body)
            except ValidationError as exc:
                self.handler.refused(request_id, exc)
                return _error_response(exc)
            output = await self.handler({"id": request_id, "input": body})
            if "error" in output:
                status, error = error_body_from_output(output)
                return web.json_response(error, status=status)
            return web.json_response(output)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        async with self._admitted(request) as request_id:
            body = await self._json_body(request)
            try:
                call = speech_call(body, max_text_chars=self.config.max_text_chars,
                                   default_language=self.config.default_language,
                                   voice_template=self.config.voice_ref_url_template,
                                   allow_ref_audio_url=self.config.http_ref_audio_url)  # fmt: skip
            except ValidationError as exc:
                self.handler.refused(request_id, exc)
                return _error_response(exc)
            streamed = FORMATS[call.response_format].streamed
            parts = self.handler.speech(request_id, call.request, stream=streamed)
            async with aclosing(parts):
                try:
                    first = await anext(parts)  # nothing is sent before the first audio exists
                except Exception as exc:  # logged and counted by the handler
                    return _error_response(exc)
                if call.stream_format == "sse":
                    return await self._send_events(request, request_id, call, first, parts)
                if streamed:
                    return await self._send_stream(request, request_id, call, first, parts)
                return await self._send_whole(request, request_id, call, first, parts)

    # ------------------------------------------------------------------ answers

    async def _send_stream(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
        response = web.StreamResponse(headers=_audio_headers(request_id, call, first.sample_rate))
        async with self._writing(request, request_id, response) as write:
            async for data in _AudioBody(call.response_format, first, parts):
                await write(data)
        return response

    async def _send_whole(self, request, request_id, call: SpeechCall, result, parts) -> web.StreamResponse:
        """A whole format: encoded once all is made, then written under the same deadline as a stream."""
        data = await _whole_body(call, result, parts)
        response = web.StreamResponse(headers={**_audio_headers(request_id, call, result.sample_rate),
                                               "X-Audio-Duration": f"{len(result.wav) / result.sample_rate:.6f}"})
        response.content_length = len(data)
        async with self._writing(request, request_id, response) as write:
            await write(data)
        return response

    async def _send_events(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
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

    # ------------------------------------------------------------------ admission

    async def _json_body(self, request: web.Request) -> object:
        """The request's body, read within HTTP_READ_TIMEOUT_S and MAX_BODY_BYTES, parsed (parse_json_body)."""
        try:
            async with asyncio.timeout(self.config.http_read_timeout_s):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes") from None
        except TimeoutError:
            raise ApiError("request_timeout", f"the request body did not arrive within "
                           f"{self.config.http_read_timeout_s:g} s (HTTP_READ_TIMEOUT_S)") from None  # fmt: skip
        return parse_json_body(raw)

    def _tts_input(self, body: object) -> object:
        """POST /tts's job input, its reference chosen as /v1/audio/speech chooses it (openai_api.voice_reference):
        a missing ref_audio_url is the voice's template URL; with HTTP_REF_AUDIO_URL=off no other is accepted."""
        if not isinstance(body, dict):
            return body  # the validation names what is wrong
        voice = body.get("voice_id")
        url = voice_reference(voice if isinstance(voice, str) else "", body.get("ref_audio_url"),
                              template=self.config.voice_ref_url_template if isinstance(voice, str) else None,
                              allow_override=self.config.http_ref_audio_url)  # fmt: skip
        return body if url is None else {**body, "ref_audio_url": url}

    @contextlib.asynccontextmanager
    async def _admitted(self, request: web.Request) -> AsyncIterator[str]:
        """The checks every work request passes (key, state, capacity); its slot is held until the block ends."""
        if not self._authorized(request):
            raise ApiError("invalid_api_key", "invalid or missing API key: send the header "
                           "'Authorization: Bearer <API_KEY>'")  # fmt: skip
        if self.state == STARTING:
            raise ApiError("worker_starting", "the worker is loading its model; retry shortly", retryable=True,
                           headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})  # fmt: skip
        if self.state != READY:
            raise ApiError("worker_shutting_down", "the worker is shutting down; retry the request (another worker "
                           "will take it)", retryable=True)  # fmt: skip
        if self.in_flight >= self.config.max_concurrency:
            raise ApiError("over_capacity", f"this worker is serving its MAX_CONCURRENCY={self.config.max_concurrency}"
                           f" requests; retry in {OVER_CAPACITY_RETRY_AFTER_S} s", retryable=True,
                           headers={"Retry-After": str(OVER_CAPACITY_RETRY_AFTER_S)})  # fmt: skip
        self.in_flight += 1
        self._idle.clear()
        try:
            yield request[REQUEST_ID]
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            presented = token.strip().encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8 (aiohttp keeps them as surrogates): not our key
            return False
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, key.encode())

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """A request id for every request; refusals and aiohttp's own errors (404, 405, 413) in OpenAI's shape."""
        request_id = f"http-{uuid.uuid4().hex[:16]}"
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except ApiError as exc:
            # Short: a caller controls the path and parts of the message (server.logtext escapes them).
            log.info("[%s] %s %s refused: %s %s", request_id, request.method, request.path[:200], exc.error_code,
                     str(exc)[:300])  # fmt: skip
            if self.metrics:
                self.metrics.http_refusals.labels(code=exc.error_code).inc()
            response = _error_response(exc)
            response.headers.update(exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(_from_aiohttp(exc))
        except ConnectionError:
            raise  # the client is gone: nobody to answer
        except Exception as exc:  # a bug: the details go to the log, the client gets internal_error
            log.error("[%s] unexpected %s", request_id, type(exc).__name__, exc_info=exc)
            response = _error_response(exc)
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response


# ---------------------------------------------------------------------- helpers


class _Stalled(Exception):
    """The client took no byte of its response for HTTP_WRITE_TIMEOUT_S."""


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


def _retrieved(task: asyncio.Future) -> None:
    """A cancelled write's task: its exception (the client's reset) is seen, not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _from_aiohttp(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError("not_found", "no such route: POST /v1/audio/speech, POST /tts and GET /ping are served")
    if exc.status == 405:
        return ApiError("method_not_allowed", f"method not allowed: {exc.reason}")
    if exc.status == 413:
        return ApiError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return ApiError("invalid_input", exc.reason or "bad request")


def _error_response(exc: BaseException) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)


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


# ---------------------------------------------------------------------- the server's life


async def serve(
    config: WorkerConfig, start: Callable[[], Awaitable[HandlerContext]], *,
    stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), metrics: Metrics | None = None,
) -> None:  # fmt: skip
    """Listen, start (`start()` builds the handler context in this loop), serve until a stop signal, drain."""
    api = HttpApi(config, metrics)
    runners = await _listen(api, config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        starting = asyncio.ensure_future(start())
        stopped = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop signal while starting: exiting without serving")
            starting.cancel()
            return
        stopped.cancel()
        api.ready(starting.result())  # StartupError (or a bug) goes up from here
        log.info("ready: serving on %s:%d%s", config.host, config.port,
                 f" (/ping also on port {config.port_health})" if config.port_health != config.port else "")
        await stopping.wait()
        api.drain()
        log.info("stop signal: draining %d request(s) in flight, refusing new ones", api.in_flight)
        try:
            await asyncio.wait_for(api.wait_idle(), config.job_timeout_s + DRAIN_GRACE_S)
        except TimeoutError:
            log.warning("%d request(s) still in flight after %.0f s: closing them", api.in_flight,
                        config.job_timeout_s + DRAIN_GRACE_S)  # fmt: skip
        log.info("drained: exiting")
    finally:
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
        for runner in reversed(runners):
            await runner.cleanup()


async def _listen(api: HttpApi, config: WorkerConfig) -> list[web.AppRunner]:
    """The API's listener on PORT, and /ping's on PORT_HEALTH when it differs; StartupError when one cannot bind."""
    health = config.port_health != config.port
    cap = connection_cap(config.http_max_connections, HEALTH_CONNECTIONS if health else 0)
    apps = [(api.app(), config.port, cap)]
    if health:
        apps.append((api.health_app(), config.port_health, HEALTH_CONNECTIONS))
    runners = []
    try:
        for app, port, limit in apps:
            # handler_cancellation: a client that disconnects cancels its handler, which frees its rows.
            # keepalive_timeout: aiohttp arms it when a connection opens and after each response, so it closes
            # both an idle connection and one that never finishes its request headers.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0,
                                   keepalive_timeout=config.http_keepalive_s)  # fmt: skip
            await runner.setup()
            runners.append(runner)
            try:
                await _CappedSite(runner, config.host, port, limit=limit, metrics=api.metrics).start()
            except OSError as exc:
                hint = " (ports below 1024 need root: set PORT and PORT_HEALTH, e.g. 8000)" if port < 1024 else ""
                raise StartupError(f"cannot listen on {config.host}:{port}: {exc.strerror or exc}{hint}") from None
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    log.info("listening on http://%s:%d (GET /ping answers 204 until the model is ready; at most %d connections)",
             config.host, config.port, cap)  # fmt: skip
    return runners


def connection_cap(wanted: int, reserved: int = 0) -> int:
    """HTTP_MAX_CONNECTIONS, lowered to what RLIMIT_NOFILE leaves after FD_RESERVE, `reserved` (the health
    listener's) and MAX_REFUSING (the refusals' own sockets), so that the worker refuses connections before the
    kernel refuses it file descriptors."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = wanted if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE - reserved - MAX_REFUSING)
    if room < wanted:
        log.warning("HTTP_MAX_CONNECTIONS=%d lowered to %d to fit the open-files limit (%d)", wanted, room, soft)
    return min(wanted, room)


class _CappedSite(web.TCPSite):
    """A TCPSite that holds at most `limit` connections open, answering one more `503 too_many_connections`
    before it closes it (never a reset nobody can explain), with the backlog LISTEN_BACKLOG."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limit: int, metrics: Metrics | None):
        super().__init__(runner, host, port, backlog=LISTEN_BACKLOG)
        self.limit = limit
        self.open = 0
        self._metrics = metrics
        self._refusing = 0
        self._refused_since_log = 0
        self._logged_at = -math.inf

    async def start(self) -> None:
        """TCPSite.start, with the capped protocol factory (and the count kept by aiohttp's close hook)."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        lost = server.connection_lost

        def connection_lost(handler, exc=None):  # aiohttp's Server hook: one of ours closed
            self.open -= 1
            lost(handler, exc)

        server.connection_lost = connection_lost
        self._server = await asyncio.get_running_loop().create_server(
            _Factory(server, self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )  # fmt: skip
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    def protocol(self, server) -> asyncio.BaseProtocol:
        if self.open < self.limit:
            self.open += 1
            return server()
        self._note_refusal()
        return _Refusal(self)

    def _note_refusal(self) -> None:
        if self._metrics:
            self._metrics.http_refusals.labels(code="too_many_connections").inc()
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("%d connection(s) refused since the last such line: %d open, HTTP_MAX_CONNECTIONS reached",
                        self._refused_since_log, self.open)  # fmt: skip
            self._logged_at, self._refused_since_log = now, 0


class _Factory:
    """The protocol factory handed to create_server: aiohttp's Server, through the site's cap."""

    def __init__(self, server, site: _CappedSite):
        self._server = server
        self._site = site

    def __call__(self) -> asyncio.BaseProtocol:
        return self._site.protocol(self._server)


_REFUSAL_BODY = json.dumps({"error": {"message": "this worker has too many open connections (HTTP_MAX_CONNECTIONS); "
                                      "retry in 1 s", "type": "server_error", "param": None,
                                      "code": "too_many_connections"}}).encode()  # fmt: skip
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)
REFUSAL_LINGER_S = 1.0  # a refused connection stays this long, reading (and dropping) what the client sends


class _Refusal(asyncio.Protocol):
    """A connection past the cap: answered 503 at once, then closed once the client has sent its request (or after
    REFUSAL_LINGER_S): closing with unread bytes would make the kernel send a reset instead of the answer."""

    def __init__(self, site: _CappedSite):
        self._site = site
        self._transport = None
        self._timer = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._site._refusing += 1
        if self._site._refusing > MAX_REFUSING:
            transport.abort()
            return
        transport.write(_REFUSAL)
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc) -> None:
        self._site._refusing -= 1
        if self._timer is not None:
            self._timer.cancel()
