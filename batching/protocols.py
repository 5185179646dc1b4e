"""The engine seam: what the scheduler and the running batches may use of an engine, as typed Protocols.

    BatchEngine   whole batches (SCHEDULING=static, StockEngine, FakeEngine): prepare_text, condition, generate
    StepEngine    a BatchEngine with the step-level calls (XttsEngine, FakeStepEngine): admit, step, evict, vocode,
                  the span vocoder of a row; the scheduler runs it continuously when `supports_steps` is True
    SpanVocoder   a row's incremental vocoder (batching.vocoder.RowVocoder, testing's FakeSpanVocoder)
    DecoderHost   what a running batch (batching.running.RunningBatch, batching.static_batch.StaticBatch) reads
                  from the engine that owns it (XttsEngine)

Every member is declared here, so the scheduler never probes an engine (no getattr or hasattr with a default):
an engine, or a test fake, that lacks one is incomplete. tests/batching/test_engine_protocols.py checks the real
engines and the fakes against these Protocols, member by member and call signature by call signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from batching.engine import Segment, SegmentAudio, TextSegment, VoiceLatents
from batching.running import FinishedRow, StepOutput


@runtime_checkable
class SpanVocoder(Protocol):
    vocoded: int  # frames vocoded so far (the vocoder's work, margins included where it has margins)

    def ready(self, n_latents: int, final: bool) -> int: ...
    def next_span(self, latents: Any, final: bool, max_frames: int | None = None) -> np.ndarray: ...
    def done(self, n_latents: int) -> bool: ...


@runtime_checkable
class BatchEngine(Protocol):
    supports_steps: ClassVar[bool]  # True: the step-level calls of StepEngine are there
    sample_rate: int  # of the audio out
    last_vocoder_s: float | None  # seconds the last generate() spent in the vocoder (None: not measured)

    def prepare_text(self, text: str, language: str) -> list[TextSegment]: ...
    def condition(self, wav: np.ndarray, sample_rate: int) -> VoiceLatents: ...
    def generate(self, segments: Sequence[Segment]) -> list[SegmentAudio]: ...


@runtime_checkable
class StepEngine(BatchEngine, Protocol):
    max_row_positions: int  # the most KV positions one row can hold (the automatic KV budget)
    vocoder_batched: bool  # vocode() takes every pending finished row in one batch (CUDA)
    vocoder_hop: int  # samples per vocoder frame at `sample_rate`

    def reserve_positions(self, segment: Segment) -> int: ...
    def admit(self, keys: Sequence, segments: Sequence[Segment]) -> None: ...
    def step(self) -> StepOutput: ...
    def evict(self, keys) -> list: ...
    def reset(self) -> None: ...
    @property
    def running(self) -> tuple: ...
    @property
    def kv_positions(self) -> int: ...
    def vocode(self, rows: Sequence[FinishedRow]) -> list[np.ndarray]: ...
    def row_vocoder(self, segment: Segment) -> SpanVocoder: ...
    def latents_of(self, key) -> Any: ...
    def vocode_span(self, vocoder: SpanVocoder, latents: Any, final: bool, max_frames: int | None) -> np.ndarray: ...
    def release_memory(self) -> None: ...


@runtime_checkable
class DecoderHost(Protocol):
    model: Any  # coqui's Xtts (its GPT and HiFi-GAN)
    device: Any  # torch.device
    max_row_positions: int
    n_audio: int  # audio codes the GPT can emit
    start_audio: int
    stop_audio: int

    def prefix(self, segment: Segment) -> Any: ...
    def row_limits(self, segment: Segment) -> tuple[int, int]: ...
    def autocast(self) -> Any: ...


PROTOCOLS = (SpanVocoder, BatchEngine, StepEngine, DecoderHost)
