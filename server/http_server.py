"""SERVER_MODE=http: an OpenAI-compatible HTTP server for a RunPod load-balancing endpoint (aiohttp, uvloop), on
the same engine, scheduler, caches, storage and metrics as the queue worker (server.handler.TTSHandler).

Routes, on HOST:PORT:

    GET  /ping              RunPod's health check: 204 while the worker starts (RunPod: "initializing"), 200 once
                            the model is loaded and warm ("healthy"), 503 while it drains after SIGTERM (anything
                            else than 200 or 204 is "unhealthy": no new requests are routed to it). Never needs
                            the API key. With PORT_HEALTH other than PORT, a second listener serves /ping alone.
    POST /v1/audio/speech   OpenAI's speech API (server.openai_api: the request; server.speech_formats: the body)
    POST /tts               the seed's job input in, the seed's output out (a queue job's `input` and `output`)

Every work request passes, in this order: API_KEY (`Authorization: Bearer <key>`, compared in constant time;
401 invalid_api_key), the worker's state (503 worker_starting with Retry-After while loading; 503
worker_shutting_down while draining), capacity (at most MAX_CONCURRENCY requests in flight: one more is answered
429 over_capacity at once, with `Retry-After: 1`, never queued: a load-balancing endpoint has no queue, and a
client or RunPod's balancer should try again, here or on another worker), and the body (MAX_BODY_BYTES: 413
request_too_large; not JSON: 400 invalid_json). Errors are OpenAI's error body (server.openai_api.error_body);
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
  Scheduler.stream: its rows leave the batch at the next step.

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
import hmac
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from aiohttp import web

from batching import SpeechResult
from batching.streaming import AudioChunk
from server.config import WorkerConfig
from server.handler import HandlerContext, TTSHandler
from server.metrics import Metrics
from server.openai_api import ApiError, SpeechCall, error_body, error_body_from_output, speech_call
from server.speech_formats import FORMATS, StreamEncoder, encode_whole_async
from server.validation import ValidationError

log = logging.getLogger("server.http")

MAX_BODY_BYTES = 1 << 20  # a request body; MAX_TEXT_CHARS of text fits many times over
STARTING_RETRY_AFTER_S = 5
OVER_CAPACITY_RETRY_AFTER_S = 1
DRAIN_GRACE_S = 30.0  # beyond JOB_TIMEOUT_S, for clients that read a finished stream slowly
SSE_PIECE_BYTES = 64 * 1024  # a whole-file format's body is sent as SSE deltas of at most this many bytes
AUDIO_TOKEN_S = 1024 / 22050  # one XTTS audio token (usage.output_tokens)

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
            body = await _json_body(request)
            output = await self.handler({"id": request_id, "input": body})
            if "error" in output:
                status, error = error_body_from_output(output)
                return web.json_response(error, status=status)
            return web.json_response(output)

    async def speech(self, request: web.Request) -> web.StreamResponse:
        async with self._admitted(request) as request_id:
            body = await _json_body(request)
            try:
                call = speech_call(body, max_text_chars=self.config.max_text_chars,
                                   default_language=self.config.default_language,
                                   voice_template=self.config.voice_ref_url_template)  # fmt: skip
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
                return await self._send_whole(request_id, call, first, parts)

    # ------------------------------------------------------------------ answers

    async def _send_stream(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
        response = web.StreamResponse(headers=_audio_headers(request_id, call, first.sample_rate))
        await response.prepare(request)
        try:
            async for data in _AudioBody(call.response_format, first, parts):
                await response.write(data)
        except ConnectionError:
            return response  # the client went away: the handler's generator is closed on the way out
        except Exception as exc:  # the status is sent already: cut the body short
            log.warning("[%s] audio cut short after its status was sent: %s", request_id, type(exc).__name__)
            _cut(request)
            return response
        await response.write_eof()
        return response

    async def _send_whole(self, request_id, call: SpeechCall, result, parts) -> web.Response:
        data = await _whole_body(call, result, parts)
        headers = {**_audio_headers(request_id, call, result.sample_rate),
                   "X-Audio-Duration": f"{len(result.wav) / result.sample_rate:.6f}"}  # fmt: skip
        return web.Response(body=data, headers=headers)

    async def _send_events(self, request, request_id, call: SpeechCall, first, parts) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": request_id})  # fmt: skip
        await response.prepare(request)
        try:
            if FORMATS[call.response_format].streamed:
                body = _AudioBody(call.response_format, first, parts)
                async for data in body:
                    await response.write(_delta(data))
                result = body.result
            else:
                result = first
                data = await _whole_body(call, result, parts)
                for lo in range(0, len(data), SSE_PIECE_BYTES):
                    await response.write(_delta(data[lo: lo + SSE_PIECE_BYTES]))
            await response.write(_event({"type": "speech.audio.done", "usage": _usage(call, result.duration_s)}))
        except ConnectionError:
            return response
        except Exception as exc:  # logged by the handler: the stream says so, and ends
            _, error = error_body(exc)
            await response.write(_event({"type": "error", **error}))
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ admission

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
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """A request id for every request; refusals and aiohttp's own errors (404, 405, 413) in OpenAI's shape."""
        request_id = f"http-{uuid.uuid4().hex[:16]}"
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except ApiError as exc:
            log.info("[%s] %s %s refused: %s %s", request_id, request.method, request.path, exc.error_code, exc)
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


async def _json_body(request: web.Request) -> object:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError("invalid_json", f"the request body is not valid JSON ({exc})") from None


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
    apps = [(api.app(), config.port)]
    if config.port_health != config.port:
        apps.append((api.health_app(), config.port_health))
    runners = []
    try:
        for app, port in apps:
            # handler_cancellation: a client that disconnects cancels its handler, which frees its rows.
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, config.host, port).start()
            except OSError as exc:
                hint = " (ports below 1024 need root: set PORT and PORT_HEALTH, e.g. 8000)" if port < 1024 else ""
                raise StartupError(f"cannot listen on {config.host}:{port}: {exc.strerror or exc}{hint}") from None
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    log.info("listening on http://%s:%d (GET /ping answers 204 until the model is ready)", config.host, config.port)
    return runners
