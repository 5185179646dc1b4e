"""Encoded test tones: `audio_bytes(fmt, seconds, sample_rate, channels)` for reference-audio and storage tests."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def tone(seconds: float, sample_rate: int = 24000, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def audio_bytes(fmt: str = "WAV", seconds: float = 2.0, sample_rate: int = 24000, channels: int = 1) -> bytes:
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, sample_rate, channels), sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()
