"""How the scheduler reads an exception from the engine thread."""

from __future__ import annotations

import torch

from batching.errors import BatchError, EngineError, FatalEngineError, OutOfMemoryError


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
