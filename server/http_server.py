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
import contextlib
import hmac
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from aiohttp import web

from server.config import WorkerConfig
from server.handler import HandlerContext, TTSHandler
from server.http_body import MAX_BODY_BYTES, error_response, from_aiohttp, parse_json_body, read_json_body
from server.http_site import HEALTH_CONNECTIONS, CappedSite, connection_cap
from server.http_speech import SpeechWriter
from server.jobs import InFlight
from server.metrics import Metrics
from server.openai_api import ApiError, error_body_from_output, speech_call, voice_reference
from server.validation import ValidationError
from storage.audio import OUTPUT_FORMATS

__all__ = ["MAX_BODY_BYTES", "HttpApi", "StartupError", "connection_cap", "parse_json_body", "serve"]

log = logging.getLogger("server.http")

STARTING_RETRY_AFTER_S = 5
OVER_CAPACITY_RETRY_AFTER_S = 1
DRAIN_GRACE_S = 30.0  # beyond JOB_TIMEOUT_S, for clients that read a finished stream slowly

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
        # Requests admitted (from admission to the answer's end, the body's read included): MAX_CONCURRENCY's
        # count and what a drain waits for. Not the job core's count (xtts_jobs_in_flight), which starts once a
        # request is a valid job, and which does not exist before the handler context is built.
        self.admitted = InFlight()
        self.writer = SpeechWriter(config, metrics)

    @property
    def in_flight(self) -> int:
        return self.admitted.count

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
        await self.admitted.wait_idle()

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
                return error_response(exc)
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
                return error_response(exc)
            streamed = OUTPUT_FORMATS[call.response_format].streamed
            parts = self.handler.speech(request_id, call.request, stream=streamed)
            async with aclosing(parts):
                try:
                    first = await anext(parts)  # nothing is sent before the first audio exists
                except Exception as exc:  # logged and counted by the handler
                    return error_response(exc)
                if call.stream_format == "sse":
                    return await self.writer.send_events(request, request_id, call, first, parts)
                if streamed:
                    return await self.writer.send_stream(request, request_id, call, first, parts)
                return await self.writer.send_whole(request, request_id, call, first, parts)

    # ------------------------------------------------------------------ answers

    # ------------------------------------------------------------------ admission

    async def _json_body(self, request: web.Request) -> object:
        return await read_json_body(request, self.config.http_read_timeout_s)

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
        self.admitted.enter()
        try:
            yield request[REQUEST_ID]
        finally:
            self.admitted.leave()

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
            response = error_response(exc)
            response.headers.update(exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(from_aiohttp(exc))
        except ConnectionError:
            raise  # the client is gone: nobody to answer
        except Exception as exc:  # a bug: the details go to the log, the client gets internal_error
            log.error("[%s] unexpected %s", request_id, type(exc).__name__, exc_info=exc)
            response = error_response(exc)
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response


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
                await CappedSite(runner, config.host, port, limit=limit, metrics=api.metrics).start()
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


