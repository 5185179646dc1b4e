"""Test material that benchmarks and tests share: demo checkpoints cached on disk, synthetic reference voices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XTTS_TEST_CACHE", ROOT / ".cache"))


def demo_checkpoint(size: str, seed: int = 0) -> Path:
    """A demo checkpoint folder under .cache/, built on first use and reused later (keyed by builder version)."""
    from batching import demo

    folder = CACHE / "demo" / f"{size}-v{demo.BUILDER_VERSION}-seed{seed}"
    if not (folder / demo.DEMO_MARKER_FILE).is_file():  # the marker is written last
        demo.build(folder, size=size, seed=seed)
    return folder


def synthetic_voice(seconds: float = 3.0, sr: int = 22050, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voice-like signal: a few harmonics with vibrato and a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    wav = 0.3 * envelope * wav / np.abs(wav).max() + 0.003 * rng.standard_normal(len(t))
    return wav.astype(np.float32)
