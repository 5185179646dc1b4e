"""Shared fixtures: demo checkpoints (built once, cached under .cache/), a loaded tiny engine, a reference voice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testing.voices import demo_checkpoint, synthetic_voice

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "demo_checkpoint", "synthetic_voice"]


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return demo_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from batching.engine import XttsEngine

    return XttsEngine.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def voice_wav() -> np.ndarray:
    return synthetic_voice()


@pytest.fixture(scope="session")
def tiny_stock_engine(tiny_checkpoint):
    """XTTS_ENGINE=stock on a model of its own, loaded as coqui loads it: HiFi-GAN keeps its weight-norm
    parametrizations, which `tiny_engine` folds. Comparisons with stock XTTS must run on this model, not on
    `tiny_engine.model`, or a fault in the folding would be on both sides and cancel out."""
    from batching.stock import StockEngine

    return StockEngine.load(tiny_checkpoint, device="cpu")
