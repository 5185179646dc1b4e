"""The GPU scheduler: one asyncio task owns the queue of waiting segments; one thread owns the model.

    handler ──submit(request)──▶ text split + voice latents (LatentCache) ──▶ waiting segments

SCHEDULING=continuous (the default; an engine with the step-level calls):

    scheduler task, at every step boundary:
        rows whose request is gone (cancelled, failed, past its deadline) ──▶ evicted
        policy.next_admission(waiting, running, budgets) ──▶ rows that join
        policy.next_vocode(finished rows) ──▶ the one row the vocoder takes now
    engine thread, one tick: engine.evict ──▶ engine.admit ──▶ engine.step ──▶ engine.vocode(that row)
        ──▶ a request whose last segment is vocoded: segments re-joined in order, its future resolves

    The vocoder interleaves with decoding steps on the engine thread (one finished row per step, the shortest
    first), so a finished row waits for at most one step of the others, and a short job never waits behind long
    rows' vocoding. Budgets: MAX_BATCH_SIZE rows and MAX_BATCH_TOKENS KV positions (see policy).

    Streamed requests (`stream()`): their current segment is vocoded span by span while it decodes
    (batching.vocoder: the same samples as one call on the whole row), the first span of a request that has
    given nothing yet before any other vocoder work; batching.streaming orders the spans across segments, with
    the joins' fades, into AudioChunks. With `vocoder_span_s` (VOCODER_SPAN_S), finished rows of every request
    are vocoded in spans of at most that much audio, one per step, instead of whole.

Backpressure: a streamed request whose caller has left more than StreamSettings.buffer_s of audio unread (a
stalled reader) is paused: its segments not yet started wait, out of the policy's sight, until the caller reads
below that bound again (its running segment finishes). So a stream holds at most buffer_s plus one segment of
unread audio, and a stalled reader costs no GPU time.

SCHEDULING=static (and engines without the step-level calls): policy.next_batch forms a batch that runs to
completion (engine.generate), then the next.

- A request whose caller went away (its task cancelled) or whose deadline passed is dropped before its
  segments cost GPU time.
- One bad row never fails the others: a failing batch is split in halves and each half retried, down to the
  row that fails; an out-of-memory batch is halved the same way. A row whose audio is not finite fails alone.
  Continuous: a failing step restarts its rows from their prompts (same seeds, so the retry is deterministic) as
  static batches split in halves; an out-of-memory step halves the row budget (and the KV budget to what was in
  use) and re-admits its rows from their prompts, oldest first; the budgets come back when the batch drains.
- A fatal device error (a CUDA error) fails every request in hand and calls `on_fatal`, which should make the
  worker exit so the platform replaces it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from batching import policy
from batching.audio import join_segments
from batching.engine import SamplingParams, Segment, SegmentAudio, TextSegment, VoiceLatents
from batching.running import StepOutput, row_seed
from batching.streaming import AudioChunk, StreamJoiner
from batching.errors import BatchError, EngineError, FatalEngineError, JobTimeoutError, OutOfMemoryError
from batching.latents import LatentCache

log = logging.getLogger(__name__)


class SchedulerClosedError(EngineError):
    error_code = "worker_shutting_down"
    retryable = True


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    language: str
    voice_key: str  # changes when the reference audio changes (its content hash)
    load_reference: Callable[[], Awaitable[tuple[np.ndarray, int]]]  # (mono float32, sample rate)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    deadline: float | None = None  # on the scheduler's clock
    on_progress: Callable[[int, int], None] | None = None  # (segments done, segments total)
    stream: bool = False  # give the audio out as it is made (Scheduler.stream); submit() ignores it


@dataclass(frozen=True)
class SpeechResult:
    wav: np.ndarray
    sample_rate: int
    duration_s: float
    segments: int
    queue_wait_s: float  # submit -> first batch with one of its rows starts
    engine_s: float  # time in batches that carried its rows
    conditioning_s: float  # 0 when the latents were cached
    latent_cache_hit: bool
    batch_sizes: tuple[int, ...]


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


@dataclass(frozen=True)
class StreamSettings:
    """How a streamed request's audio is cut: a first span of `first_s` seconds of audio, each next one twice as
    long, up to `max_s` (STREAM_FIRST_CHUNK_S, STREAM_MAX_CHUNK_S). A short first span gives the first audio
    early; long later ones cost the vocoder fewer margins (batching.vocoder) and the caller fewer messages."""

    first_s: float = 0.5
    max_s: float = 8.0
    # Most audio a stream's caller may leave unread before the stream's next segments wait (STREAM_BUFFER_S).
    buffer_s: float = 60.0

    def __post_init__(self):
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"stream chunks must be 0 < first <= max seconds, got {self.first_s}, {self.max_s}")
        if not self.buffer_s > 0:
            raise ValueError(f"a stream's unread-audio bound must be > 0 seconds, got {self.buffer_s}")


class _Request:
    def __init__(self, req: SpeechRequest, segments: list[TextSegment], voice: VoiceLatents, now: float):
        self.req = req
        self.voice = voice
        self.texts = segments
        self.audio: list[SegmentAudio | None] = [None] * len(segments)
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.submitted_at = now  # when its segments joined the queue (after text preparation and latents)
        self.first_batch_at: float | None = None
        self.engine_s = 0.0
        self.batch_sizes: list[int] = []
        self.conditioning_s = 0.0
        self.latent_hit = False
        # Streamed requests (Scheduler.stream): chunks out through `chunks`, then the result or the error.
        self.joiner: StreamJoiner | None = None
        self.chunks: asyncio.Queue | None = None
        self.unread_s = 0.0  # audio in `chunks` that the caller has not taken yet
        self.buffer_s = math.inf  # streamed: past this much unread audio, its segments not yet started wait
        self.vocoders: dict[int, object] = {}  # segment index -> its RowVocoder (engine thread objects)
        self.spans: dict[int, list[np.ndarray]] = {}  # segment index -> its spans so far (vocoder_span_s)
        self.span_frames = 0  # the next span's length for the current segment
        self.preempted: set[int] = set()  # segments sent back to the queue once (policy.preempt): never again

    @property
    def streamed(self) -> bool:
        return self.joiner is not None

    @property
    def finished(self) -> bool:
        return self.future.done()

    @property
    def paused(self) -> bool:
        """A stalled reader's stream: its segments not yet started stay out of the batch."""
        return self.unread_s > self.buffer_s

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            if self.chunks is not None:
                self.chunks.put_nowait(exc)


@dataclass(frozen=True, eq=False)
class _Row:
    request: _Request
    index: int
    order: int
    seed: int  # the row's seed, drawn at submit when the request has none: a retried row gives the same audio
    due: float | None = None  # a streamed request's later segment: when its audio is needed (policy.Waiting.due)


class Scheduler:
    def __init__(
        self,
        engine,
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
        if max_batch_size < 1:
            raise ValueError(f"MAX_BATCH_SIZE must be an integer >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"BATCH_WAIT_MS must be >= 0, got {batch_wait_s * 1000:g}")
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"SCHEDULING must be continuous or static, got {scheduling!r}")
        if max_batch_tokens < 0:
            raise ValueError(f"MAX_BATCH_TOKENS must be an integer >= 0 (0: automatic), got {max_batch_tokens}")
        # Continuous needs the step-level calls; the stock engine and test fakes run whole batches.
        self.continuous = scheduling == "continuous" and bool(getattr(engine, "supports_steps", False))
        if max_batch_tokens == 0 and self.continuous:
            max_batch_tokens = max_batch_size * engine.max_row_positions
        self.max_batch_tokens = max_batch_tokens
        self.engine = engine
        self.latents = latents
        self.stream_settings = stream_settings or StreamSettings()
        # Spans are counted in vocoder frames: `hop` samples each at the engine's output rate.
        frame_s = getattr(engine, "vocoder_hop", 256) / getattr(engine, "sample_rate", 24000)
        self._first_frames = max(1, math.ceil(self.stream_settings.first_s / frame_s))
        self._max_frames = max(self._first_frames, round(self.stream_settings.max_s / frame_s))
        # Continuous, per-row vocoding: finished rows vocoded in spans of at most this many frames (None: whole).
        spans_apply = self.continuous and not getattr(engine, "vocoder_batched", False) and vocoder_span_s
        self._span_cap = max(1, round(vocoder_span_s / frame_s)) if spans_apply else None
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.observer = observer or Observer()
        self.on_fatal = on_fatal
        self._waiting: dict[_Row, policy.Waiting] = {}
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._closed = False
        self._busy = False
        # Continuous state, owned by the scheduler task.
        self._running: dict[_Row, int] = {}  # row -> its KV reservation
        self._finished: dict[_Row, tuple] = {}  # row -> (FinishedRow, finishing order, times passed over)
        self._finish_order = itertools.count()
        self._row_cap = max_batch_size  # shrunk after an out-of-memory step, restored when the batch drains
        self._kv_cap = max_batch_tokens
        self._row_peak: dict[_Row, int] = {}  # the most rows a running row shared a step with
        self._retry: list[_Row] = []
        self._tokens: dict[_Row, int] = {}  # running row -> tokens decoded (its latents so far)
        self._vocoded = False  # the vocoder ran since the engine last gave memory back
        self._oom_rows: set[_Row] = set()  # rows re-queued after an out-of-memory step

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None:
            loop = self._run_continuous() if self.continuous else self._run()
            self._task = asyncio.create_task(loop, name="scheduler")

    async def close(self) -> None:
        """Stop taking requests, fail those still waiting, stop the loop and the engine thread."""
        self._closed = True
        for row in list(self._waiting):
            row.request.fail(SchedulerClosedError("the worker is shutting down; retry the job"))
        self._waiting.clear()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)
        for row in [*self._running, *self._finished]:
            row.request.fail(SchedulerClosedError("the worker is shutting down; retry the job"))
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
            raise SchedulerClosedError("the worker is shutting down; retry the job")
        segments = await asyncio.to_thread(self.engine.prepare_text, req.text, req.language)
        t0 = time.perf_counter()
        voice, hit = await self.latents.get(req.voice_key, lambda: self._condition(req))
        request = _Request(req, segments, voice, self.clock())
        request.latent_hit = hit
        request.conditioning_s = 0.0 if hit else time.perf_counter() - t0
        if stream:
            request.joiner = StreamJoiner(len(segments), self.engine.sample_rate)
            request.chunks = asyncio.Queue()
            request.buffer_s = self.stream_settings.buffer_s
            request.span_frames = self._first_frames
        self.observer.conditioning_done(request.conditioning_s, hit)
        if self._closed:
            raise SchedulerClosedError("the worker is shutting down; retry the job")
        now = self.clock()
        ahead_s = 0.0  # audio of the segments before this one (streamed: when this one's audio is needed)
        for i, seg in enumerate(segments):
            due = now + ahead_s if stream and i > 0 else None
            row = _Row(request, i, next(self._order), row_seed(req.params.seed), due)
            self._waiting[row] = self._queued(row, self._reservation(row) if self.continuous else 0)
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

    def _admissible(self) -> list[policy.Waiting]:
        """The waiting segments the policy may pick: all but those of paused streams (a stalled reader's)."""
        return [waiting for row, waiting in self._waiting.items() if not row.request.paused]

    def _drop(self, request: _Request) -> None:
        for row in [r for r in self._waiting if r.request is request]:
            del self._waiting[row]
        self.observer.queue_depth(len(self._waiting))

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while True:
            self._expire()
            decision = policy.next_batch(
                self._admissible(), self.clock(),
                max_batch_size=self.max_batch_size, batch_wait_s=self.batch_wait_s,
            )  # fmt: skip
            if isinstance(decision, policy.Idle):
                await self._sleep(None)
            elif isinstance(decision, policy.WaitUntil):
                await self._sleep(max(0.0, decision.deadline - self.clock()))
            else:
                rows = [key for key in decision.keys]
                for row in rows:
                    del self._waiting[row]
                self.observer.queue_depth(len(self._waiting))
                rows = [r for r in rows if not r.request.finished]
                if rows:
                    self._busy = True
                    try:
                        await self._run_rows(rows)
                    finally:
                        self._busy = False

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    def _expire(self) -> None:
        now = self.clock()
        for request in {r.request for r in [*self._waiting, *self._running, *self._finished]}:
            deadline = request.req.deadline
            if deadline is not None and now >= deadline:
                request.fail(JobTimeoutError(f"job timed out after waiting {now - request.submitted_at:.1f} s"))
                self._drop(request)

    async def _run_rows(self, rows: list[_Row]) -> None:
        """Run rows as one batch; on failure, split in halves and retry each, so only failing rows fail."""
        started = self.clock()
        self.observer.rows_admitted(len(rows))
        for row in rows:
            if row.request.first_batch_at is None:
                row.request.first_batch_at = started
        segments = [self._segment(r) for r in rows]
        t0 = time.perf_counter()
        try:
            audio = await self.run_on_engine(self.engine.generate, segments)
            if len(audio) != len(rows):
                raise BatchError(f"engine returned {len(audio)} results for {len(rows)} rows")
        except Exception as exc:
            error = _classify(exc)
            if isinstance(error, FatalEngineError):
                self._fatal(error, rows)
                return
            if len(rows) == 1:
                log.warning("request %s: segment %d failed: %s", rows[0].request.req.request_id, rows[0].index, exc)
                self.observer.rows_failed(1, error)
                rows[0].request.fail(error)
                return
            half = len(rows) // 2
            log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
            for part in (rows[:half], rows[half:]):
                part = [r for r in part if not r.request.finished]
                if part:
                    await self._run_rows(part)
            return
        elapsed = time.perf_counter() - t0
        self.observer.batch_done(len(rows), elapsed, sum(len(a.codes) for a in audio))
        vocoder_s = getattr(self.engine, "last_vocoder_s", None)
        if vocoder_s is not None:
            self.observer.vocoder_done(vocoder_s)
        for row, result in zip(rows, audio, strict=True):
            self._deliver(row, result, elapsed, len(rows))

    def _deliver(self, row: _Row, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        """One segment's whole audio: checked, stored (a streamed request's joiner gets what its spans have not
        given yet), progress reported, the request completed when it was the last."""
        request = row.request
        if request.finished:
            return
        if not np.isfinite(result.wav).all():
            self.observer.rows_failed(1, BatchError("non-finite audio"))
            request.fail(BatchError("generation produced non-finite audio (NaN or inf) for this segment"))
            return
        if request.streamed:
            self._give(request, row.index, result.wav[request.joiner.received(row.index):], ended=True)
            result = SegmentAudio(result.codes, np.zeros(0, dtype=np.float32))  # the joiner holds the audio
        self._segment_done(row, result, engine_s, batch_size)

    def _give(self, request: _Request, index: int, samples: np.ndarray, ended: bool) -> None:
        chunk = request.joiner.add(index, samples, ended)
        if chunk is not None:
            request.unread_s += len(chunk.samples) / chunk.sample_rate
            request.chunks.put_nowait(chunk)

    def _segment_done(self, row: _Row, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        request = row.request
        request.engine_s += engine_s
        request.batch_sizes.append(batch_size)
        request.audio[row.index] = result
        done = sum(a is not None for a in request.audio)
        if request.req.on_progress:
            try:
                request.req.on_progress(done, len(request.audio))
            except Exception:  # a progress hook must never fail the job
                log.exception("progress callback failed")
        if done == len(request.audio):
            self._complete(request)

    @staticmethod
    def _segment(row: _Row) -> Segment:
        text = row.request.texts[row.index]
        params = row.request.req.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=row.seed)
        return Segment(text.tokens, len(text.text), row.request.voice, params)

    def _complete(self, request: _Request) -> None:
        if request.streamed:
            wav = request.joiner.audio()  # exactly the chunks given out
        else:
            wav = join_segments([a.wav for a in request.audio], self.engine.sample_rate)
        sr = self.engine.sample_rate
        request.future.set_result(
            SpeechResult(
                wav=wav,
                sample_rate=sr,
                duration_s=len(wav) / sr,
                segments=len(request.audio),
                queue_wait_s=(request.first_batch_at or request.submitted_at) - request.submitted_at,
                engine_s=request.engine_s,
                conditioning_s=request.conditioning_s,
                latent_cache_hit=request.latent_hit,
                batch_sizes=tuple(request.batch_sizes),
            )
        )
        if request.streamed:
            request.chunks.put_nowait(request.future.result())

    # ---------------------------------------------------------------- the continuous loop

    async def _run_continuous(self) -> None:
        try:
            await self._continuous_loop()
        except Exception as exc:  # a bug here must not leave every job waiting forever: fail them, then exit
            log.exception("the scheduler loop failed")
            self._fatal(FatalEngineError(f"the scheduler failed: {type(exc).__name__}: {exc}"),
                        list(self._waiting))  # fmt: skip

    async def _continuous_loop(self) -> None:
        while True:
            self._expire()
            gone = [r for r in self._running if r.request.finished]
            for row in gone:
                del self._running[row]
                self._row_peak.pop(row, None)
            if gone:
                self.observer.rows_evicted(len(self._running))
            for row in [r for r in self._finished if r.request.finished]:
                del self._finished[row]
            self._oom_rows = {r for r in self._oom_rows if r in self._waiting or r in self._running}
            if not self._running and not self._oom_rows:  # the batch has drained since the last OOM: full budgets
                self._row_cap, self._kv_cap = self.max_batch_size, self.max_batch_tokens
            gone += self._preempt()  # evicted from the engine like rows that left; they wait again
            decision = policy.next_admission(
                self._admissible(), self.clock(),
                running_rows=len(self._running), running_span=max(self._running.values(), default=0),
                max_rows=self._row_cap, max_positions=self._kv_cap, batch_wait_s=self.batch_wait_s,
            )  # fmt: skip
            admit: list[_Row] = []
            if isinstance(decision, policy.Batch) and decision.keys:
                for row in decision.keys:
                    reservation = self._waiting.pop(row).positions
                    if not row.request.finished:
                        admit.append(row)
                        self._running[row] = reservation
                self.observer.queue_depth(len(self._waiting))
            if not self._running and not self._finished and not gone:
                if isinstance(decision, policy.Idle):
                    if self._vocoded and hasattr(self.engine, "release_memory"):
                        self._vocoded = False
                        await self.run_on_engine(self.engine.release_memory)
                        continue  # the world may have changed while the engine thread trimmed
                    await self._sleep(None)
                elif isinstance(decision, policy.WaitUntil):
                    await self._sleep(max(0.0, decision.deadline - self.clock()))
                continue
            now = self.clock()
            for row in admit:
                self._tokens[row] = 0
                if row.request.first_batch_at is None:
                    row.request.first_batch_at = now
            for row in gone:
                self._tokens.pop(row, None)
            if admit:
                self.observer.rows_admitted(len(admit))
            picked, spans = self._pick_vocoder_work()
            newest = max([self._finished[row][1] for row in picked]
                         + [_RUNNING_ORDER if s.finished is None else self._finished[s.row][1] for s in spans],
                         default=-1)  # fmt: skip
            vocode = {row: self._finished.pop(row)[0] for row in picked}
            for row, (f, order, passed, solo) in list(self._finished.items()):
                if order < newest:  # overtaken by a row that finished after it
                    self._finished[row] = (f, order, passed + 1, solo)
            self._busy = True
            self._vocoded = self._vocoded or bool(vocode or spans)
            try:
                tick = await self.run_on_engine(self._tick, gone, admit, list(vocode.values()), spans)
                self._after_tick(tick, vocode)
                if self._retry:
                    rows, self._retry = self._retry, []
                    half = len(rows) // 2
                    for part in (rows[:half], rows[half:]):
                        part = [r for r in part if not r.request.finished]
                        if part:
                            await self._run_rows(part)
            finally:
                self._busy = False

    def _pick_vocoder_work(self) -> tuple[list[_Row], list[_Span]]:
        """What the vocoder does in this tick: finished rows to vocode whole, and spans of streamed rows.

        On the CPU, where the vocoder runs between steps, one piece of work per tick: first the first span of a
        streamed request that has given out nothing yet (the oldest request first: time to first audio); then,
        shortest first (policy.next_vocode), a finished row or the next span of a streamed request's current
        segment. Where the engine vocodes in batches (CUDA), every pending finished row in one batch, and one span.
        """
        whole = {r: v for r, v in self._finished.items() if not self._in_spans(r)}
        spans = self._span_candidates()
        first = [c for c in spans if c.first]
        if first:
            return [], [min(first, key=lambda c: c.row.order)]
        if getattr(self.engine, "vocoder_batched", False):
            rows = [r for r, (_, _, _, solo) in whole.items() if not solo] or list(whole)[:1]
            pending = [policy.Finished(c, c.frames, _RUNNING_ORDER if c.finished is None else
                                       self._finished[c.row][1], 0) for c in spans]  # fmt: skip
            key = policy.next_vocode(pending)
            return rows, [key] if key is not None else []
        pending = [policy.Finished(row, _frames_estimate(len(f.codes), row.request.req.params.speed), order, passed)
                   for row, (f, order, passed, _) in whole.items()]  # fmt: skip
        for c in spans:
            order, passed = (_RUNNING_ORDER, 0) if c.finished is None else self._finished[c.row][1:3]
            pending.append(policy.Finished(c, c.frames, order, passed))
        key = policy.next_vocode(pending)
        if key is None:
            return [], []
        return ([], [key]) if isinstance(key, _Span) else ([key], [])

    def _in_spans(self, row: _Row) -> bool:
        """Is this finished row vocoded span by span (streamed, or vocoder_span_s set) rather than whole?"""
        return row.request.streamed or self._span_cap is not None

    def _span_candidates(self) -> list[_Span]:
        """Spans of streamed rows the vocoder could take now: the current segment's next span (once that many
        frames are settled, or its row finished), and any finished later segment whole."""
        out = []
        rows = [r for r in self._running if r.request.streamed] + [r for r in self._finished if self._in_spans(r)]
        for row in rows:
            request = row.request
            if request.finished:
                continue
            if not request.streamed:  # a finished row vocoded in spans of at most vocoder_span_s
                f = self._finished[row][0]
                vocoder = request.vocoders.get(row.index)
                if vocoder is None:
                    vocoder = request.vocoders[row.index] = self.engine.row_vocoder(self._segment(row))
                frames = min(vocoder.ready(len(f.latents), final=True), self._span_cap)
                out.append(_Span(row, vocoder, f, self._span_cap, frames, False, False))
                continue
            current = row.index == request.joiner.current
            finished = self._finished[row][0] if row in self._finished else None
            if finished is None and not current:
                continue
            vocoder = request.vocoders.get(row.index)
            if vocoder is None:
                vocoder = request.vocoders[row.index] = self.engine.row_vocoder(self._segment(row))
            # The current segment's spans grow from STREAM_FIRST_CHUNK_S; a finished later segment goes in spans
            # of at most vocoder_span_s, as any finished row (None: whole).
            limit = request.span_frames if current else self._span_cap
            if finished is not None:
                ready = vocoder.ready(len(finished.latents), final=True)
                frames = ready if limit is None else min(ready, limit)
            else:
                ready = vocoder.ready(self._tokens.get(row, 0), final=False)
                if ready < limit:
                    continue
                frames = limit
            out.append(_Span(row, vocoder, finished, limit, frames, current and request.joiner.given == 0, current))
        return out

    def _tick(self, gone: list[_Row], admit: list[_Row], vocode: list, spans: list[_Span]) -> _Tick:
        """On the engine thread: evict, admit, one step, then vocode the chosen finished rows and spans."""
        engine, tick = self.engine, _Tick()
        if gone:
            engine.evict(gone)
        try:
            if admit:
                engine.admit(admit, [self._segment(r) for r in admit])
            if engine.running:
                t0 = time.perf_counter()
                tick.step = engine.step()
                tick.step_s = time.perf_counter() - t0
        except Exception as exc:
            tick.step_error = exc
            engine.reset()
        if vocode:
            try:
                t0 = time.perf_counter()
                tick.wavs = engine.vocode(vocode)
                tick.vocode_s = time.perf_counter() - t0
                if len(tick.wavs) != len(vocode):
                    raise BatchError(f"engine returned {len(tick.wavs)} waveforms for {len(vocode)} rows")
            except Exception as exc:
                tick.vocode_error = exc
        finished_now = {f.key: f for f in tick.step.finished} if tick.step is not None else {}
        for job in spans:
            t0 = time.perf_counter()
            before = job.vocoder.vocoded
            try:
                f = job.finished or finished_now.get(job.row)
                if f is not None:
                    latents, final = f.latents, True
                elif job.row in engine.running:
                    latents, final = engine.latents_of(job.row), False
                else:  # evicted, or its step failed: nothing to vocode
                    continue
                wav = engine.vocode_span(job.vocoder, latents, final, job.max_frames)
                done = final and job.vocoder.done(len(latents))
                tick.spans.append((job, wav, None, time.perf_counter() - t0, job.vocoder.vocoded - before, done))
            except Exception as exc:
                tick.spans.append((job, None, exc, time.perf_counter() - t0, 0, False))
        tick.kv_positions = engine.kv_positions
        return tick

    def _after_tick(self, tick: _Tick, vocode: dict) -> None:
        if tick.step is not None:
            out = tick.step
            rows = len(out.keys)
            self.observer.batch_done(rows, tick.step_s, rows)
            for request in {row.request for row in out.keys}:
                request.engine_s += tick.step_s
            for row in out.keys:
                self._row_peak[row] = max(self._row_peak.get(row, 0), rows)
                self._tokens[row] = self._tokens.get(row, 0) + 1
            for f in out.finished:
                row = f.key
                self._running.pop(row, None)
                self._tokens.pop(row, None)
                if not row.request.finished:
                    self._finished[row] = (f, next(self._finish_order), 0, False)
                else:
                    self._row_peak.pop(row, None)
            self.observer.step_done(len(self._running), tick.step_s, tick.kv_positions, self._kv_cap)
        if tick.step_error is not None:
            self._step_failed(tick.step_error, list(self._running))
        if vocode:
            if tick.vocode_error is not None:
                self._vocode_failed(tick.vocode_error, vocode)
            else:
                self.observer.vocoder_done(tick.vocode_s)
                for (row, f), wav in zip(vocode.items(), tick.wavs, strict=True):
                    row.request.engine_s += tick.vocode_s / len(vocode)
                    self._deliver(row, SegmentAudio(f.codes, wav), 0.0, self._row_peak.pop(row, 1))
        for job, wav, error, seconds, work, done in tick.spans:
            self._span_done(job, wav, error, seconds, work, done)

    def _span_done(self, job: _Span, wav, error, seconds: float, work: int, done: bool) -> None:
        row, request = job.row, job.row.request
        if request.finished:
            return
        if error is not None:
            error = _classify(error)
            if isinstance(error, FatalEngineError):
                self._fatal(error, [row])
                return
            log.warning("request %s: segment %d failed in the vocoder: %s", request.req.request_id, row.index,
                        error)  # fmt: skip
            self.observer.rows_failed(1, error)
            request.fail(error)
            return
        if not np.isfinite(wav).all():
            self.observer.rows_failed(1, BatchError("non-finite audio"))
            request.fail(BatchError("generation produced non-finite audio (NaN or inf) for this segment"))
            return
        self.observer.vocoder_done(seconds)
        self.observer.span_vocoded(seconds, work, len(wav) // getattr(self.engine, "vocoder_hop", 256))
        request.engine_s += seconds
        if not request.streamed:  # a non-streamed row vocoded in spans: whole once its last span is in
            parts = request.spans.setdefault(row.index, [])
            parts.append(wav)
            if done:
                f = self._finished.pop(row)[0]
                self._deliver(row, SegmentAudio(f.codes, np.concatenate(parts)), 0.0, self._row_peak.pop(row, 1))
            return
        if job.grows:  # the current segment's span: the next one is longer
            request.span_frames = min(2 * request.span_frames, self._max_frames)
        self._give(request, row.index, wav, ended=done)
        if done:
            f = self._finished.pop(row)[0]
            self._segment_done(row, SegmentAudio(f.codes, np.zeros(0, dtype=np.float32)), 0.0,
                               self._row_peak.pop(row, 1))  # fmt: skip

    def _step_failed(self, exc: BaseException, rows: list[_Row]) -> None:
        error = _classify(exc)
        for row in rows:
            self._running.pop(row, None)
            self._row_peak.pop(row, None)
        rows = [r for r in rows if not r.request.finished]
        if isinstance(error, FatalEngineError):
            self._fatal(error, rows)
            return
        if len(rows) <= 1:
            for row in rows:
                log.warning("request %s: segment %d failed: %s", row.request.req.request_id, row.index, exc)
                self.observer.rows_failed(1, error)
                row.request.fail(error)
            return
        if isinstance(error, OutOfMemoryError):
            self._row_cap = max(1, len(rows) // 2)
            in_use = len(rows) * max(self._reservation(r) for r in rows)
            self._kv_cap = max(1, min(self._kv_cap, in_use // 2))
            self._oom_rows.update(rows)
            log.warning("batch of %d failed (%s: %s); re-admitting its rows from their prompts, at most %d rows "
                        "and %d KV positions", len(rows), type(exc).__name__, exc, self._row_cap,
                        self._kv_cap)  # fmt: skip
            for row in rows:
                self._waiting[row] = self._queued(row, self._reservation(row))
            self.observer.queue_depth(len(self._waiting))
            return
        # Any other error: the rows restart from their prompts (same seeds) as static batches split in halves,
        # down to the row that fails; the continuous batch resumes after them.
        log.warning("batch of %d failed (%s: %s); retrying in halves", len(rows), type(exc).__name__, exc)
        self._retry.extend(rows)

    def _vocode_failed(self, exc: BaseException, rows: dict) -> None:
        error = _classify(exc)
        if isinstance(error, FatalEngineError):
            self._fatal(error, list(rows))
            return
        if len(rows) > 1:  # a batched vocoder call: each row again, alone
            for row, f in rows.items():
                if not row.request.finished:
                    self._finished[row] = (f, next(self._finish_order), 0, True)
            return
        for row in rows:
            self._row_peak.pop(row, None)
            log.warning("request %s: segment %d failed in the vocoder: %s", row.request.req.request_id, row.index,
                        exc)  # fmt: skip
            self.observer.rows_failed(1, error)
            row.request.fail(error)

    def _reservation(self, row: _Row) -> int:
        return self.engine.reserve_positions(self._segment(row))

    @staticmethod
    def _queued(row: _Row, positions: int) -> policy.Waiting:
        """What the policy sees of a row in the queue (at submit, and when it goes back after an OOM or a
        preemption: the same rank as before)."""
        request = row.request
        return policy.Waiting(row, request.req.voice_key, len(request.texts[row.index].tokens),
                              request.submitted_at, row.order, positions, row.due,
                              starts_stream=request.streamed and row.index == 0)  # fmt: skip

    def _preempt(self) -> list[_Row]:
        """Running later segments of streams sent back to the queue for waiting first segments (policy.preempt)."""
        if not any(w.starts_stream for w in self._waiting.values()):
            return []
        candidates = [
            policy.Running(row, row.due, self._tokens.get(row, 0)) for row in self._running
            if row.due is not None and not row.request.finished and row.index not in row.request.preempted
            and row.index != row.request.joiner.current and row.index not in row.request.vocoders
        ]  # fmt: skip
        victims = policy.preempt(list(self._waiting.values()), candidates,
                                 free_rows=max(0, self._row_cap - len(self._running)),
                                 min_lead_s=PREEMPT_MIN_LEAD_S)  # fmt: skip
        for row in victims:
            positions = self._running.pop(row)
            self._tokens.pop(row, None)
            self._row_peak.pop(row, None)
            row.request.preempted.add(row.index)
            self._waiting[row] = self._queued(row, positions)
        if victims:
            log.info("%d later segment(s) of streams back to the queue for streams waiting for their first audio",
                     len(victims))  # fmt: skip
            self.observer.rows_preempted(len(victims))
        return list(victims)

    def _fatal(self, error: FatalEngineError, rows: list[_Row]) -> None:
        log.critical("fatal engine error: %s", error)
        for row in [*rows, *self._running, *self._finished]:
            row.request.fail(error)
        self._running.clear()
        self._finished.clear()
        for row in list(self._waiting):
            row.request.fail(error)
        self._waiting.clear()
        self._closed = True
        if self.on_fatal:
            self.on_fatal(error)


@dataclass(eq=False)
class _Tick:
    """What one engine-thread tick of continuous scheduling did."""

    step: StepOutput | None = None
    step_s: float = 0.0
    step_error: BaseException | None = None
    wavs: list | None = None
    vocode_s: float = 0.0
    vocode_error: BaseException | None = None
    kv_positions: int = 0
    spans: list = field(default_factory=list)  # (span, samples, error, seconds, frames vocoded, row done)


# About how fast speech goes (XTTS at speed 1, most languages): to tell when a streamed segment's audio is needed.
SPOKEN_CHARS_PER_S = 15.0

# A running later segment of a stream is sent back to the queue for another stream's first segment only when its
# own audio is needed at least this long after the other stream's first audio (policy.preempt).
PREEMPT_MIN_LEAD_S = 2.0

# A span of a row still decoding counts as finishing after every row that has finished (policy.next_vocode).
_RUNNING_ORDER = 1 << 62


@dataclass(frozen=True, eq=False)
class _Span:
    """A span of a streamed row for the vocoder: of a row still decoding when `finished` is None."""

    row: _Row
    vocoder: object  # batching.vocoder.RowVocoder
    finished: object | None  # batching.running.FinishedRow
    max_frames: int | None  # None: the rest of the row (vocoded whole)
    frames: int  # about how many frames it gives (the policy's length)
    first: bool  # it gives its request's first audio
    grows: bool  # the current segment's span of a streamed request: the next one is twice as long


def _frames_estimate(tokens: int, speed: float) -> int:
    """About how many vocoder frames a row of `tokens` audio tokens gives (XTTS: 1024 samples per token at
    22050 Hz, 256 per frame at 24000 Hz), to compare whole rows with spans."""
    return round(tokens * 4 * 24000 / 22050 / max(speed, 0.05))


def _classify(exc: BaseException) -> EngineError:
    """Map an exception from the engine thread to the error the scheduler acts on."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OutOfMemoryError(f"the batch did not fit in GPU memory: {exc}")
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text or "cuDNN error" in text):
        return FatalEngineError(f"the GPU is in an unusable state: {text}")
    return BatchError(f"generation failed: {type(exc).__name__}: {text}")
