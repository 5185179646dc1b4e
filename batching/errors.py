"""Errors raised by the GPU side. Every error the worker returns to a caller carries a stable `error_code`.

    EngineError                  the engine could not serve a request
    ├── InputError               the request itself is wrong (client error: do not retry as is)
    │   ├── UnsupportedLanguageError
    │   ├── EmptyTextError
    │   ├── UntokenizableTextError
    │   └── TextTooLongError
    ├── ModelNotLoadedError      the model could not be loaded at start (the seed's "XTTS V2 model is not loaded")
    ├── BatchError               one batch failed; the scheduler splits and retries it
    ├── OutOfMemoryError         a batch did not fit on the device; the scheduler halves it
    ├── FatalEngineError         the device is unusable (a CUDA error): the worker must exit
    └── JobTimeoutError          a job outlasted its deadline (JOB_TIMEOUT_S): raised by the scheduler for a
                                 request past its deadline, and by the server's handler for the whole job
                                 (download, queue, generation and upload together); the one `job_timeout`
"""

from __future__ import annotations


class EngineError(Exception):
    error_code = "engine_error"
    retryable = False


class InputError(EngineError):
    error_code = "invalid_input"


class UnsupportedLanguageError(InputError):
    error_code = "unsupported_language"


class EmptyTextError(InputError):
    error_code = "empty_text"


class UntokenizableTextError(InputError):
    error_code = "untokenizable_text"


class TextTooLongError(InputError):
    error_code = "text_too_long"


class ModelNotLoadedError(EngineError):
    error_code = "model_not_loaded"


class BatchError(EngineError):
    error_code = "generation_failed"
    retryable = True


class OutOfMemoryError(BatchError):
    error_code = "out_of_memory"


class FatalEngineError(EngineError):
    error_code = "fatal_engine_error"
    retryable = True  # this worker's GPU is gone; the same job runs on the worker RunPod starts instead


class JobTimeoutError(EngineError):
    """A job outlasted JOB_TIMEOUT_S. Retryable: the same job may finish on a less busy worker."""

    error_code = "job_timeout"
    retryable = True
