"""How the scheduler fails: one row alone, never its batch; non-finite audio; a failing batch retried in halves.

- `classify`: an exception from the engine thread as the error the scheduler acts on (fatal, out of memory, or
  a batch error).
- `fail_row`: one row fails alone: logged, counted (Observer.rows_failed), its request failed; the other rows
  of its batch go on.
- `finite_or_fail`: a row whose audio is not finite (NaN or inf) fails alone.
- `retry_in_halves`: a failing batch of several rows runs again as two halves, each in turn, down to the row
  that fails (the rows keep their seeds, so a retried row gives the same audio).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import torch

from batching.errors import BatchError, EngineError, FatalEngineError, OutOfMemoryError

log = logging.getLogger("batching.scheduler")


def classify(exc: BaseException) -> EngineError:
    """Map an exception from the engine thread to the error the scheduler acts on."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OutOfMemoryError(f"the batch did not fit in GPU memory: {exc}")
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text or "cuDNN error" in text):
        return FatalEngineError(f"the GPU is in an unusable state: {text}")
    return BatchError(f"generation failed: {type(exc).__name__}: {text}")


def fail_row(observer, row, error: BaseException, *, stage: str = "") -> None:
    """One row fails alone: logged, counted, its request failed (`stage`: where, for the log)."""
    log.warning("request %s: segment %d failed%s: %s", row.request.req.request_id, row.index, stage, error)
    observer.rows_failed(1, error)
    row.request.fail(error)


def finite_or_fail(observer, row, wav: np.ndarray) -> bool:
    """True when the row's audio is finite; otherwise the row fails alone (its request with it)."""
    if np.isfinite(wav).all():
        return True
    error = BatchError("generation produced non-finite audio (NaN or inf) for this segment")
    observer.rows_failed(1, error)
    row.request.fail(error)
    return False


async def retry_in_halves(rows: Sequence, run: Callable[[list], Awaitable[None]]) -> None:
    """Run the first half of a failed batch, then the second, each without the rows whose request is gone."""
    half = len(rows) // 2
    for part in (rows[:half], rows[half:]):
        part = [r for r in part if not r.request.finished]
        if part:
            await run(part)
