"""Joining a request's segment waveforms: the short fades at every join, and the join itself.

Pure numpy, no torch: the engine (whole files), batching.streaming (chunk by chunk, the same samples) and the
server use it without loading the model's libraries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Fade applied on both sides of each join between two segments of one request, so that the step between the
# last sample of one and the first of the next does not click.
JOIN_FADE_S = 0.005


def fade(wav: np.ndarray, n: int, *, head: bool, tail: bool) -> np.ndarray:
    """A copy of `wav` with a raised-cosine fade-in over its first `n` samples (`head`) and/or a fade-out over its
    last `n` (`tail`); `n` <= len(wav)."""
    if n <= 0 or not (head or tail):
        return wav
    wav = wav.copy()
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n, dtype=np.float64))).astype(np.float32)
    if head:
        wav[:n] *= ramp
    if tail:
        wav[-n:] *= ramp[::-1]
    return wav


def join_segments(wavs: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """Concatenate segment waveforms with a short fade on each side of every inner join (at most half a segment)."""
    if not wavs:
        return np.zeros(0, dtype=np.float32)
    n = int(JOIN_FADE_S * sample_rate)
    last = len(wavs) - 1
    faded = [fade(w, min(n, len(w) // 2), head=i > 0, tail=i < last) for i, w in enumerate(wavs)]
    return np.concatenate(faded).astype(np.float32)
