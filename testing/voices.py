"""Test material that benchmarks and tests share: demo checkpoints cached on disk, synthetic reference voices."""

from __future__ import annotations

import fcntl
import io
import os
from pathlib import Path

from batching.demo import synthetic_voice

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["CACHE", "demo_checkpoint", "synthetic_voice", "synthetic_voice_wav"]
CACHE = Path(os.environ.get("XTTS_TEST_CACHE", ROOT / ".cache"))


def demo_checkpoint(size: str, seed: int = 0) -> Path:
    """A demo checkpoint folder under .cache/, built on first use and reused later (keyed by builder version)."""
    from batching import demo

    folder = CACHE / "demo" / f"{size}-v{demo.BUILDER_VERSION}-seed{seed}"
    if (folder / demo.DEMO_MARKER_FILE).is_file():  # the marker is written last
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: test processes running side by side (pytest-xdist) wait for the first one's build.
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / demo.DEMO_MARKER_FILE).is_file():
            demo.build(folder, size=size, seed=seed)
    return folder


def synthetic_voice_wav(seconds: float = 3.0, sr: int = 22050, f0: float = 140.0, seed: int = 0) -> bytes:
    """`synthetic_voice(seconds, sr, f0, seed)` as a 16-bit PCM WAV file, in memory."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, synthetic_voice(seconds, sr=sr, f0=f0, seed=seed), sr, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
