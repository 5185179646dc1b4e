"""What a handler needs, built once by `python -m server` after the engine is loaded and warm (`HandlerContext`).

The handler depends on what it calls, not on those classes: the context types its three seams as protocols
(`ResultStore` from storage.results, `ReferenceSource` and `SpeechScheduler` below), which the real classes and the
tests' stand-ins both satisfy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from server.config import WorkerConfig
from server.metrics import Metrics

if TYPE_CHECKING:
    from batching import SpeechRequest, SpeechResult
    from batching.streaming import AudioChunk
    from storage.cache import CachedReference
    from storage.results import ResultStore


class ReferenceSource(Protocol):
    """Reference audio by voice_id and URL, as a file on disk (storage.ReferenceCache)."""

    def use(self, voice_id: str, url: str) -> AbstractAsyncContextManager[CachedReference]:
        """The reference's file, found or fetched, kept (pinned) until the block ends."""
        ...

    def discard(self, voice_id: str, url: str) -> bool:
        """Forget the entry (a file that did not decode), so the next job fetches it afresh."""
        ...

    @property
    def bytes(self) -> int:
        """Bytes held on disk (a metric)."""
        ...


class SpeechScheduler(Protocol):
    """The GPU side (batching.Scheduler): a request in, its audio out; deadlines are on its `clock`."""

    clock: Callable[[], float]

    async def submit(self, request: SpeechRequest) -> SpeechResult: ...

    def stream(self, request: SpeechRequest) -> AsyncIterator[AudioChunk | SpeechResult]: ...


@dataclass
class HandlerContext:
    """What a handler needs, built once by `python -m server` after the engine is loaded and warm."""

    config: WorkerConfig
    storage: ResultStore  # where results go (storage.Storage)
    references: ReferenceSource  # storage.ReferenceCache
    scheduler: SpeechScheduler  # batching.Scheduler
    metrics: Metrics | None
    reference_sample_rate: int  # the engine's input rate (XTTS: 22050 Hz)
    max_reference_s: float  # the engine uses at most this much of a reference (XTTS: max_ref_len, 30 s)
    clock: Callable[[], float] = time.perf_counter
    # runpod.serverless.progress_update in RunPod's production loop; None elsewhere (the local test API has no
    # channel for it). Called with (job, message) as the segments of a multi-segment job finish.
    progress: Callable[[dict, str], None] | None = None
