"""A row's sampling parameters, torch-free: the server validates a job against these defaults without importing
the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding parameters. `seed=None` draws a fresh seed; `do_sample=False` is greedy (tests).

    The defaults here are the worker's only sampling defaults: `server.validation` takes a job's defaults from
    `SamplingParams()`. The temperature is the seed's 0.7, not XTTS's config (0.75): the seed's contract came first
    and its clients send nothing when they want the documented default."""

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.85
    repetition_penalty: float = 5.0
    speed: float = 1.0
    seed: int | None = None
    do_sample: bool = True
    # Row length limits in audio tokens. The stop token cannot come before min_new_tokens; a row ends after
    # max_new_tokens (None: the model's maximum, or the engine's length rule when neither is set).
    min_new_tokens: int = 0
    max_new_tokens: int | None = None


SAMPLING_DEFAULTS = SamplingParams()
