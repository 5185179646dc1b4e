"""A streamed request's audio: segment spans in, ordered chunks out, with the same joins as the whole file.

The scheduler vocodes a streamed request's rows span by span (batching.vocoder) and hands each span here, with its
segment's index. `StreamJoiner` puts them in order (a later segment that finished first waits for the ones before
it), applies the fades `batching.audio.join_segments` puts at every join between two segments, and gives out
what is ready as `AudioChunk`s. The chunks of a request, concatenated, are the request's audio: the scheduler
returns exactly that concatenation as the result, so the stored file and the stream are the same samples.

The fade of a join needs to know the segment's length when the segment is shorter than two fades; and a
segment's tail is faded only when it is known to be its tail. So the joiner holds back a segment's first
2 x fade samples until it has them all (or the segment ended), and its last `fade` samples until it ended.

Pure Python and numpy, on the event loop; no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batching.audio import JOIN_FADE_S, fade


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """The next piece of a streamed request's audio: float32 mono samples from `start` (in samples)."""

    index: int
    samples: np.ndarray
    start: int
    sample_rate: int

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


class _Segment:
    def __init__(self):
        self.buffer: list[np.ndarray] = []
        self.shipped = 0  # samples of this segment already given out
        self.head_done = False
        self.ended = False

    def take(self) -> np.ndarray:
        wav = np.concatenate(self.buffer) if self.buffer else np.zeros(0, dtype=np.float32)
        self.buffer = []
        return wav


class StreamJoiner:
    def __init__(self, segments: int, sample_rate: int):
        self.sample_rate = sample_rate
        self.fade = int(JOIN_FADE_S * sample_rate)
        self._segments = [_Segment() for _ in range(segments)]
        self._current = 0  # the first segment not fully given out
        self._chunks = 0
        self._given = 0  # samples given out, all segments
        self._parts: list[np.ndarray] = []  # everything given out, for the result

    @property
    def done(self) -> bool:
        return self._current >= len(self._segments)

    @property
    def current(self) -> int:
        """The first segment not fully given out (the one whose audio comes next)."""
        return self._current

    @property
    def given(self) -> int:
        """Samples given out so far."""
        return self._given

    def received(self, index: int) -> int:
        """Samples of segment `index` received so far (given out or held back)."""
        s = self._segments[index]
        return s.shipped + sum(len(b) for b in s.buffer)

    def add(self, index: int, samples: np.ndarray, ended: bool) -> AudioChunk | None:
        """The next samples of segment `index` (in order within it); `ended` when they are its last. Returns the
        chunk that became ready (None when nothing did)."""
        seg = self._segments[index]
        if seg.ended:
            raise ValueError(f"segment {index} already ended")
        if len(samples):
            seg.buffer.append(np.asarray(samples, dtype=np.float32))
        seg.ended = ended
        out = []
        while not self.done:
            wav = self._release(self._current)
            if wav is not None and len(wav):
                out.append(wav)
            if not self._segments[self._current].ended:
                break
            self._current += 1
        if not out:
            return None
        wav = np.concatenate(out)
        chunk = AudioChunk(self._chunks, wav, self._given, self.sample_rate)
        self._chunks += 1
        self._given += len(wav)
        self._parts.append(wav)
        return chunk

    def audio(self) -> np.ndarray:
        """Everything given out so far, in order: the whole request's audio once `done`."""
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)

    def _release(self, index: int) -> np.ndarray | None:
        """What segment `index` (the current one) can give out now, faded as join_segments fades it."""
        seg = self._segments[index]
        last = len(self._segments) - 1
        head, tail = index > 0, index < last
        wav = seg.take()
        if seg.ended:
            if head and not seg.head_done:  # nothing given out yet: the whole segment is here
                n = min(self.fade, len(wav) // 2)
                wav = fade(wav, n, head=True, tail=tail)
            elif tail:
                n = min(self.fade, (seg.shipped + len(wav)) // 2)  # held back: the last `fade` samples are here
                wav = fade(wav, n, head=False, tail=True)
            seg.shipped += len(wav)
            return wav
        if head and not seg.head_done:
            if len(wav) < 2 * self.fade:  # the fade's length depends on the segment's: wait for more
                seg.buffer = [wav]
                return None
            wav = fade(wav, self.fade, head=True, tail=False)
        seg.head_done = True
        keep = min(self.fade, len(wav)) if tail else 0  # the tail fade may reach this far back
        ready, held = wav[: len(wav) - keep], wav[len(wav) - keep :]
        seg.buffer = [held] if len(held) else []
        seg.shipped += len(ready)
        return ready
