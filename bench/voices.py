"""Test material that benchmarks and tests share: demo checkpoints cached on disk, synthetic reference voices."""

from __future__ import annotations

import os
from pathlib import Path

from batching.demo import synthetic_voice

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["CACHE", "demo_checkpoint", "synthetic_voice"]
CACHE = Path(os.environ.get("XTTS_TEST_CACHE", ROOT / ".cache"))


def demo_checkpoint(size: str, seed: int = 0) -> Path:
    """A demo checkpoint folder under .cache/, built on first use and reused later (keyed by builder version)."""
    from batching import demo

    folder = CACHE / "demo" / f"{size}-v{demo.BUILDER_VERSION}-seed{seed}"
    if not (folder / demo.DEMO_MARKER_FILE).is_file():  # the marker is written last
        demo.build(folder, size=size, seed=seed)
    return folder


