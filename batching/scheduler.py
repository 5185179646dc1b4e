"""The GPU scheduler's front door: one asyncio task owns the queue of waiting segments; one thread owns the model.

    handler ──submit(request) / stream(request)──▶ text split + voice latents (LatentCache) ──▶ waiting segments

This module holds what the handler sees (submit, stream, start, close; the records it takes and gives, re-exported
from batching.records) and the lifecycle (enqueue, abandon, fatal). The rest lives in rooms named for it:

    batching/records.py     SpeechRequest, SpeechResult, StreamSettings; _Request (delivers its audio), _Row
    batching/waiting.py     the waiting queue (budgets in, rows out; TGI's queue.rs)
    batching/static.py      the static loop (SCHEDULING=static, or a BatchEngine): whole batches, one by one
    batching/continuous.py  the continuous core: schedule, execute (engine thread), update, at every step
    batching/spans.py       which finished rows and which spans the vocoder takes in a tick
    batching/failures.py    one row fails alone, non-finite audio, retries in halves
    batching/protocols.py   the engine seam (BatchEngine, StepEngine)

SCHEDULING=continuous (the default; an engine whose `supports_steps` is True):

    scheduler task, at every step boundary:
        rows whose request is gone (cancelled, failed, past its deadline) ──▶ evicted
        policy.next_admission(waiting, running, budgets) ──▶ rows that join
        batching.spans ──▶ the vocoder's work: on the CPU one piece (policy.next_vocode: a finished row, or a
                           span, the shortest first); where the engine vocodes in batches (CUDA), every pending
                           finished row at once, and one span
    engine thread, one tick: engine.evict ──▶ engine.admit ──▶ engine.step ──▶ engine.vocode / vocode_span
        ──▶ a request whose last segment is vocoded: segments re-joined in order, its future resolves

    The vocoder interleaves with decoding steps on the engine thread, so a finished row waits for at most one step
    of the others, and a short job never waits behind long rows' vocoding. Budgets: MAX_BATCH_SIZE rows and
    MAX_BATCH_TOKENS KV positions (see policy).

    Streamed requests (`stream()`): their current segment is vocoded span by span while it decodes
    (batching.vocoder: the same samples as one call on the whole row), the first span of a request that has
    given nothing yet before any other vocoder work; batching.streaming orders the spans across segments, with
    the joins' fades, into AudioChunks. With `vocoder_span_s` (VOCODER_SPAN_S), finished rows of every request
    are vocoded in spans of at most that much audio, one per step, instead of whole.

Backpressure: a streamed request whose caller has left more than StreamSettings.buffer_s of audio unread (a
stalled reader) is paused: its segments not yet started wait, out of the policy's sight, until the caller reads
below that bound again (its running segment finishes). So a stream holds at most buffer_s plus one segment of
unread audio, and a stalled reader costs no GPU time.

- A request whose caller went away (its task cancelled) or whose deadline passed is dropped before its
  segments cost GPU time.
- One bad row never fails the others (batching.failures): a failing batch is retried in halves down to the row
  that fails; a row whose audio is not finite fails alone. The continuous core's answers to a failing or
  out-of-memory step are in batching.continuous.
- A fatal device error (a CUDA error) fails every request in hand and calls `on_fatal`, which should make the
  worker exit so the platform replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from batching.continuous import _ContinuousCore
from batching.engine import VoiceLatents
from batching.errors import EngineError, FatalEngineError, JobTimeoutError
from batching.latents import LatentCache
from batching.protocols import BatchEngine, StepEngine
from batching.records import (
    PREEMPT_MIN_LEAD_S, SPOKEN_CHARS_PER_S, SpeechRequest, SpeechResult, StreamSettings, _Request, _Row,
)  # fmt: skip
from batching.running import row_seed
from batching.spans import _SpanPlanner
from batching.static import _StaticLoop
from batching.streaming import AudioChunk, StreamJoiner
from batching.waiting import WaitingQueue

__all__ = [
    "JobTimeoutError", "Observer", "PREEMPT_MIN_LEAD_S", "SPOKEN_CHARS_PER_S", "Scheduler", "SchedulerClosedError",
    "SpeechRequest", "SpeechResult", "StreamSettings",
]  # fmt: skip

log = logging.getLogger(__name__)


class SchedulerClosedError(EngineError):
    error_code = "worker_shutting_down"
    retryable = True


class Observer:
    """Hooks for metrics; the default does nothing. Called on the event loop."""

    def batch_done(self, size: int, seconds: float, tokens: int) -> None: ...
    def queue_depth(self, segments: int) -> None: ...
    def conditioning_done(self, seconds: float, hit: bool) -> None: ...
    def rows_failed(self, count: int, error: BaseException) -> None: ...
    def vocoder_done(self, seconds: float) -> None: ...
    # Continuous scheduling: once per decoding step, and once per admission.
    def step_done(self, rows: int, seconds: float, kv_positions: int, kv_budget: int) -> None: ...
    def rows_admitted(self, count: int) -> None: ...
    def rows_evicted(self, running: int) -> None: ...  # rows left without finishing; `running` remain
    # Streamed requests: once per vocoded span, with the frames the vocoder ran on and those it gave out.
    def span_vocoded(self, seconds: float, frames: int, given: int) -> None: ...
    def rows_preempted(self, count: int) -> None: ...  # running rows sent back to the queue (policy.preempt)


def _closing() -> SchedulerClosedError:
    return SchedulerClosedError("the worker is shutting down; retry the job")


def _check_settings(max_batch_size: int, batch_wait_s: float, scheduling: str, max_batch_tokens: int) -> None:
    if max_batch_size < 1:
        raise ValueError(f"MAX_BATCH_SIZE must be an integer >= 1, got {max_batch_size}")
    if batch_wait_s < 0:
        raise ValueError(f"BATCH_WAIT_MS must be >= 0, got {batch_wait_s * 1000:g}")
    if scheduling not in ("continuous", "static"):
        raise ValueError(f"SCHEDULING must be continuous or static, got {scheduling!r}")
    if max_batch_tokens < 0:
        raise ValueError(f"MAX_BATCH_TOKENS must be an integer >= 0 (0: automatic), got {max_batch_tokens}")


class Scheduler(_StaticLoop, _ContinuousCore, _SpanPlanner):
    def __init__(
        self,
        engine: BatchEngine | StepEngine,
        latents: LatentCache,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.015,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        scheduling: str = "continuous",
        max_batch_tokens: int = 0,
        stream_settings: StreamSettings | None = None,
        vocoder_span_s: float | None = None,
    ):
        _check_settings(max_batch_size, batch_wait_s, scheduling, max_batch_tokens)
        # Continuous needs the step-level calls; the stock engine and FakeEngine run whole batches.
        self.continuous = scheduling == "continuous" and engine.supports_steps
        if max_batch_tokens == 0 and self.continuous:
            max_batch_tokens = max_batch_size * engine.max_row_positions
        self.max_batch_tokens = max_batch_tokens
        self.engine = engine
        self.latents = latents
        self.stream_settings = stream_settings or StreamSettings()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.observer = observer or Observer()
        self.on_fatal = on_fatal
        self._waiting = WaitingQueue()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closed = False
        self._busy = False
        self._init_spans(vocoder_span_s)
        self._init_continuous()

    def _init_spans(self, vocoder_span_s: float | None) -> None:
        """Span lengths in vocoder frames (`hop` samples each at the engine's output rate); only a continuous
        core vocodes in spans."""
        self._first_frames = self._max_frames = 1
        self._span_cap = None  # finished rows vocoded in spans of at most this many frames (None: whole)
        if not self.continuous:
            return
        frame_s = self.engine.vocoder_hop / self.engine.sample_rate
        self._first_frames = max(1, math.ceil(self.stream_settings.first_s / frame_s))
        self._max_frames = max(self._first_frames, round(self.stream_settings.max_s / frame_s))
        if not self.engine.vocoder_batched and vocoder_span_s:
            self._span_cap = max(1, round(vocoder_span_s / frame_s))

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None:
            loop = self._run_continuous() if self.continuous else self._run()
            self._task = asyncio.create_task(loop, name="scheduler")

    async def close(self) -> None:
        """Stop taking requests, fail those still waiting, stop the loop and the engine thread."""
        self._closed = True
        for row in self._waiting.clear():
            row.request.fail(_closing())
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)
        for row in [*self._running, *self._finished]:
            row.request.fail(_closing())
        self._running.clear()
        self._finished.clear()

    def poke(self) -> None:
        """Make the loop look at the queue again now (tests that move the clock by hand call this)."""
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._busy and not self._running and not self._finished

    @property
    def running_rows(self) -> int:
        return len(self._running)

    async def run_on_engine(self, fn, *args):
        """Run `fn(*args)` on the engine thread (the only thread that may touch the model)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ---------------------------------------------------------------- the handler-facing call

    async def submit(self, req: SpeechRequest) -> SpeechResult:
        """The request's audio, whole, once its last segment is vocoded."""
        request = await self._enqueue(req, stream=False)
        try:
            # shield: a cancelled caller must not cancel the future the scheduler resolves; it is dropped instead.
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            self._abandon(request)
            raise

    async def stream(self, req: SpeechRequest) -> AsyncIterator[AudioChunk | SpeechResult]:
        """The request's audio as it is made: AudioChunks in order, then the SpeechResult (its `wav` is the
        chunks joined). A failure is raised after the chunks given so far. Leaving the loop early (the caller
        went away) drops the request: its rows leave the batch at the next step."""
        request = await self._enqueue(req, stream=True)
        try:
            while True:
                item = await request.chunks.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, AudioChunk):
                    was_paused = request.paused
                    request.unread_s -= len(item.samples) / item.sample_rate
                    if was_paused and not request.paused:
                        self._wake.set()  # its waiting segments may run again
                yield item
                if isinstance(item, SpeechResult):
                    return
        finally:
            if not request.future.done():
                self._abandon(request)
            elif not request.future.cancelled():
                request.future.exception()  # seen through the queue: not an exception "never retrieved"

    async def _enqueue(self, req: SpeechRequest, *, stream: bool) -> _Request:
        if self._closed:
            raise _closing()
        segments = await asyncio.to_thread(self.engine.prepare_text, req.text, req.language)
        t0 = time.perf_counter()
        voice, hit = await self.latents.get(req.voice_key, lambda: self._condition(req))
        request = _Request(req, segments, voice, self.clock(), self.engine.sample_rate)
        request.latent_hit = hit
        request.conditioning_s = 0.0 if hit else time.perf_counter() - t0
        if stream:
            request.joiner = StreamJoiner(len(segments), self.engine.sample_rate)
            request.chunks = asyncio.Queue()
            request.buffer_s = self.stream_settings.buffer_s
            request.span_frames = self._first_frames
        self.observer.conditioning_done(request.conditioning_s, hit)
        if self._closed:
            raise _closing()
        now = self.clock()
        ahead_s = 0.0  # audio of the segments before this one (streamed: when this one's audio is needed)
        for i, seg in enumerate(segments):
            due = now + ahead_s if stream and i > 0 else None
            row = _Row(request, i, self._waiting.next_order(), row_seed(req.params.seed), due)
            self._waiting.put(row, self._reservation(row) if self.continuous else 0)
            ahead_s += len(seg.text) / SPOKEN_CHARS_PER_S / max(req.params.speed, 0.05)
        self.observer.queue_depth(len(self._waiting))
        self._wake.set()
        return request

    def _abandon(self, request: _Request) -> None:
        request.future.cancel()
        self._drop(request)
        self._wake.set()  # its running rows leave at the next step

    async def _condition(self, req: SpeechRequest) -> VoiceLatents:
        wav, sr = await req.load_reference()
        return await self.run_on_engine(self.engine.condition, wav, sr)

    def _drop(self, request: _Request) -> None:
        self._waiting.drop(request)
        self.observer.queue_depth(len(self._waiting))

    def _reservation(self, row: _Row) -> int:
        return self.engine.reserve_positions(row.segment())

    def _expire(self) -> None:
        """Requests past their deadline fail, and their rows leave the queue (the running ones at the next step)."""
        now = self.clock()
        for request in {r.request for r in [*self._waiting, *self._running, *self._finished]}:
            deadline = request.req.deadline
            if deadline is not None and now >= deadline:
                request.fail(JobTimeoutError(f"job timed out after waiting {now - request.submitted_at:.1f} s"))
                self._drop(request)

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    def _fatal(self, error: FatalEngineError, rows: list[_Row]) -> None:
        log.critical("fatal engine error: %s", error)
        for row in [*rows, *self._running, *self._finished]:
            row.request.fail(error)
        self._running.clear()
        self._finished.clear()
        for row in self._waiting.clear():
            row.request.fail(error)
        self._closed = True
        if self.on_fatal:
            self.on_fatal(error)
