"""Fake engines for the scheduler's tests: whole batches (`FakeEngine`) and step by step (`FakeStepEngine`).

Both implement the engine Protocols of batching.protocols completely (tests/batching/test_engine_protocols.py
checks it), so the scheduler never needs to guess what an engine can do. A fake segment's audio spells its text
(`spell`: one run of SAMPLES_PER_CHAR samples per character, its level the character's code), and `spoken` reads
it back: a wrong join order, a lost or doubled segment, or another request's audio all read differently.

Also the small helpers the scheduler tests share: `reference` (a silent reference voice), `request` (a
SpeechRequest of a text), `settle` (wait until a condition holds) and `Clock` (a clock the test moves).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from batching.engine import SegmentAudio, TextSegment, VoiceLatents
from batching.running import FinishedRow, StepOutput
from batching.scheduler import SpeechRequest

SAMPLES_PER_CHAR = 11  # wider than twice the 5 ms join fade at 1000 Hz: each run's middle sample is never faded


class Clock:
    """A scheduler's clock that stands still until a test moves `now`."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def char_value(c: str) -> float:
    return ord(c) / 1024.0


def spell(text: str) -> np.ndarray:
    """The fake engine's audio for `text`: one run of SAMPLES_PER_CHAR samples per character, its level the
    character's code."""
    return np.repeat(np.array([char_value(c) for c in text], dtype=np.float32), SAMPLES_PER_CHAR)


def spoken(wav: np.ndarray) -> str:
    """The text a (joined) fake waveform spells: the middle sample of each run, which a join's fade never
    touches. A wrong join order, a lost or doubled segment, or another request's audio all read differently."""
    assert len(wav) % SAMPLES_PER_CHAR == 0, len(wav)
    middles = np.asarray(wav, dtype=np.float64)[SAMPLES_PER_CHAR // 2:: SAMPLES_PER_CHAR]
    return "".join(chr(round(v * 1024.0)) for v in middles)


class FakeEngine:
    """Segments are the text split on '|'; a row's audio spells its text (`spell`: a run of samples per
    character, read back with `spoken`).

    A segment containing FAIL raises, NAN gives non-finite audio, FATAL raises a CUDA error, and a batch larger
    than `oom_above` raises an out-of-memory error. Every batch and every conditioning is recorded, and `gate`
    can hold the engine thread inside a batch.
    """

    sample_rate = 1000
    supports_steps = False  # whole batches only (batching.protocols.BatchEngine)
    last_vocoder_s: float | None = None  # a test sets it to see it reach the observer

    def __init__(self, oom_above=None):
        self.batches: list[list[str]] = []
        self.conditioned: list[int] = []
        self.oom_above = oom_above
        self.threads = set()
        self.gate = threading.Event()
        self.gate.set()
        self._texts: dict[tuple, str] = {}

    def prepare_text(self, text, language):
        segments = []
        for t in text.split("|"):
            tokens = (len(self._texts),) + tuple(ord(c) for c in t)
            self._texts[tokens] = t
            segments.append(TextSegment(t, tokens))
        return segments

    def condition(self, wav, sample_rate):
        self.threads.add(threading.current_thread().name)
        self.conditioned.append(len(wav))
        return VoiceLatents(torch.zeros(1, 32, 4), torch.zeros(1, 512, 1))

    def generate(self, segments):
        self.threads.add(threading.current_thread().name)
        self.gate.wait(30)
        texts = [self._texts[s.tokens] for s in segments]
        self.batches.append(texts)
        if self.oom_above is not None and len(segments) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("FATAL" in t for t in texts):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any("FAIL" in t for t in texts):
            raise ValueError("this row is broken")
        out = []
        for t in texts:
            wav = spell(t)
            if "NAN" in t:
                wav[0] = np.nan
            out.append(SegmentAudio(np.arange(len(t)), wav))
        return out


class FakeSpanVocoder:
    """A row's span vocoder (batching.protocols.SpanVocoder): one frame per latent, every frame settled but the
    last while the row decodes; its spans are `FakeStepEngine.SPAN_LEVEL` throughout."""

    def __init__(self):
        self.vocoded = 0  # frames given so far (a fake needs no margins)

    def ready(self, n_latents: int, final: bool) -> int:
        return max(0, (n_latents if final else n_latents - 1) - self.vocoded)

    def next_span(self, latents, final: bool, max_frames: int | None = None) -> np.ndarray:
        ready = self.ready(len(latents), final)
        frames = ready if max_frames is None else min(ready, max_frames)
        self.vocoded += frames
        return np.full(frames, FakeStepEngine.SPAN_LEVEL, dtype=np.float32)

    def done(self, n_latents: int) -> bool:
        return self.vocoded >= n_latents


class FakeStepEngine(FakeEngine):
    """A row of text t runs len(t) steps. FAIL in a row makes every step holding it raise, FATAL a CUDA error,
    NAN gives non-finite audio, and a step of more than `oom_above` rows runs out of memory. `step_s` and
    `vocode_s` slow the calls down; every call is recorded."""

    supports_steps = True
    max_row_positions = 1000
    vocoder_batched = False
    vocoder_hop = 256
    SPAN_LEVEL = 0.1

    def __init__(self, oom_above=None, step_s=0.0, vocode_s=0.0):
        super().__init__(oom_above)
        self.step_s, self.vocode_s = step_s, vocode_s
        self.rows: dict = {}  # key -> [segment, text, tokens so far]
        self.admitted: list[list[str]] = []
        self.steps: list[list[str]] = []
        self.evicted: list[str] = []
        self.vocoded: list[str] = []
        self.released = 0

    def reserve_positions(self, segment):
        return 10 + len(self._texts[segment.tokens])

    def admit(self, keys, segments):
        texts = [self._texts[s.tokens] for s in segments]
        self.admitted.append(texts)
        for key, segment, text in zip(keys, segments, texts, strict=True):
            self.rows[key] = [segment, text, 0]

    def step(self):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.step_s)
        texts = [row[1] for row in self.rows.values()]
        self.steps.append(texts)
        if self.oom_above is not None and len(texts) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("FATAL" in t for t in texts):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any("FAIL" in t for t in texts):
            raise ValueError("this row is broken")
        keys = tuple(self.rows)
        finished = []
        for key in keys:
            row = self.rows[key]
            row[2] += 1
            if row[2] >= len(row[1]):
                finished.append(FinishedRow(key, row[0], np.arange(row[2]), np.zeros((row[2], 1), np.float32)))
                del self.rows[key]
        return StepOutput(keys, tuple(0 for _ in keys), finished)

    def evict(self, keys):
        dropped = [k for k in keys if k in self.rows]
        for k in dropped:
            self.evicted.append(self.rows.pop(k)[1])
        return dropped

    def reset(self):
        self.rows.clear()

    @property
    def running(self):
        return tuple(self.rows)

    @property
    def kv_positions(self):
        return sum(10 + row[2] for row in self.rows.values())

    def vocode(self, rows):
        time.sleep(self.vocode_s)
        out = []
        for f in rows:
            text = self._texts[f.segment.tokens]
            self.vocoded.append(text)
            wav = np.full(len(text), 0.1, dtype=np.float32)
            if "NAN" in text:
                wav[0] = np.nan
            out.append(wav)
        return out

    def row_vocoder(self, segment):
        return FakeSpanVocoder()

    def latents_of(self, key):
        return np.zeros((self.rows[key][2], 1), np.float32)

    def vocode_span(self, vocoder, latents, final, max_frames):
        return vocoder.next_span(latents, final, max_frames)

    def release_memory(self):
        self.released += 1


async def reference():
    return np.zeros(16000, dtype=np.float32), 16000


def request(text, voice="v1", **kw):
    return SpeechRequest(text=text, language="en", voice_key=voice, load_reference=reference, **kw)


async def settle(until=lambda: True):
    """Let submitted jobs reach the queue (text preparation runs in a worker thread)."""
    for _ in range(500):
        await asyncio.sleep(0.01)
        if until():
            return
    raise AssertionError("the condition never held")
