"""Shared fixtures: demo checkpoints (built once, cached under .cache/), a loaded tiny engine, a reference voice, a
throwaway service account and one fake-gcs-server on 127.0.0.1 for the session (it starts in well under a second;
every test takes a bucket of its own).

Helpers that tests share live in testing/, never in a test module: no test imports another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from testing.accounts import ServiceAccount, make_service_account
from testing.e2e_worker import OPEN_LOGS, tail
from testing.gcs_emulator import GcsEmulator
from testing.voices import demo_checkpoint, synthetic_voice


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the tail of every worker log open now (testing.e2e_worker.OPEN_LOGS)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, path in list(OPEN_LOGS.items()):
            report.sections.append((f"worker log ({name}): {path}", tail(path)))


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


@pytest.fixture(scope="session")
def service_account() -> ServiceAccount:
    return make_service_account()


@pytest.fixture(scope="session")
def emulator() -> Iterator[GcsEmulator]:
    with GcsEmulator() as emu:
        yield emu
