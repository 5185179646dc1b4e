"""The scheduler's records: the request as the handler gives it (SpeechRequest), its result (SpeechResult), the
stream settings, and the scheduler's own record of a request in hand (_Request) and of each of its segments (_Row).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from batching.audio import join_segments
from batching.engine import SamplingParams, Segment, SegmentAudio, TextSegment, VoiceLatents
from batching.protocols import SpanVocoder
from batching.streaming import StreamJoiner

log = logging.getLogger("batching.scheduler")


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
    """A request in hand: its segments' audio as it arrives, its result channel (a future; streamed, also a queue
    of chunks), its timings. The scheduler delivers each segment's audio here, and the last one completes it."""

    def __init__(self, req: SpeechRequest, segments: list[TextSegment], voice: VoiceLatents, now: float,
                 sample_rate: int):  # fmt: skip
        self.req = req
        self.voice = voice
        self.texts = segments
        self.sample_rate = sample_rate  # the engine's output rate
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
        self.vocoders: dict[int, SpanVocoder] = {}  # segment index -> its RowVocoder (engine thread objects)
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

    def deliver(self, index: int, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        """Segment `index`'s whole audio (checked finite by the caller): stored (a streamed request's joiner gets
        what its spans have not given yet), progress reported, the request completed when it was the last."""
        if self.finished:
            return
        if self.streamed:
            self.give(index, result.wav[self.joiner.received(index):], ended=True)
            result = SegmentAudio(result.codes, np.zeros(0, dtype=np.float32))  # the joiner holds the audio
        self.segment_done(index, result, engine_s, batch_size)

    def give(self, index: int, samples: np.ndarray, ended: bool) -> None:
        """A streamed request's next samples of segment `index`: out as a chunk when the joiner has one."""
        chunk = self.joiner.add(index, samples, ended)
        if chunk is not None:
            self.unread_s += len(chunk.samples) / chunk.sample_rate
            self.chunks.put_nowait(chunk)

    def segment_done(self, index: int, result: SegmentAudio, engine_s: float, batch_size: int) -> None:
        self.engine_s += engine_s
        self.batch_sizes.append(batch_size)
        self.audio[index] = result
        done = sum(a is not None for a in self.audio)
        if self.req.on_progress:
            try:
                self.req.on_progress(done, len(self.audio))
            except Exception:  # a progress hook must never fail the job
                log.exception("progress callback failed")
        if done == len(self.audio):
            self._complete()

    def _complete(self) -> None:
        if self.streamed:
            wav = self.joiner.audio()  # exactly the chunks given out
        else:
            wav = join_segments([a.wav for a in self.audio], self.sample_rate)
        sr = self.sample_rate
        self.future.set_result(
            SpeechResult(
                wav=wav,
                sample_rate=sr,
                duration_s=len(wav) / sr,
                segments=len(self.audio),
                queue_wait_s=(self.first_batch_at or self.submitted_at) - self.submitted_at,
                engine_s=self.engine_s,
                conditioning_s=self.conditioning_s,
                latent_cache_hit=self.latent_hit,
                batch_sizes=tuple(self.batch_sizes),
            )
        )
        if self.streamed:
            self.chunks.put_nowait(self.future.result())


@dataclass(frozen=True, eq=False)
class _Row:
    """One segment of a request, the unit the queue, the policy and the engine see (its key)."""

    request: _Request
    index: int
    order: int
    seed: int  # the row's seed, drawn at submit when the request has none: a retried row gives the same audio
    due: float | None = None  # a streamed request's later segment: when its audio is needed (policy.Waiting.due)

    def segment(self) -> Segment:
        """What the engine decodes: the segment's tokens, the voice and the parameters with the row's seed."""
        text = self.request.texts[self.index]
        params = self.request.req.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=self.seed)
        return Segment(text.tokens, len(text.text), self.request.voice, params)


# About how fast speech goes (XTTS at speed 1, most languages): to tell when a streamed segment's audio is needed.
SPOKEN_CHARS_PER_S = 15.0

# A running later segment of a stream is sent back to the queue for another stream's first segment only when its
# own audio is needed at least this long after the other stream's first audio (policy.preempt).
PREEMPT_MIN_LEAD_S = 2.0
