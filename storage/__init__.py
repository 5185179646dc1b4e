"""Storage for the worker: where reference audio comes from and where results go.

    env.py       EnvReader: the worker's one reader of environment variables (server.config uses it too)
    config.py    StorageConfig.from_env: every variable, validated once
    urls.py      parse_ref_url / validate_voice_id (the one voice_id rule): what a caller may point us at (no I/O)
    backend.py   the Storage interface
    gcs.py       GCS through gcloud-aio-storage (real or STORAGE_EMULATOR_HOST)
    local.py     local folder backend (the default when no bucket is configured)
    factory.py   open_storage(config): picks and checks a backend (the only importer of gcs.py / local.py)
    _http.py     shared aiohttp session, guarded DNS, capped streaming, error mapping
    retry.py     backoff with jitter under a deadline
    cache.py     ReferenceCache: voice_id + reference -> file on disk (LRU, atomic, single-flight)
    audio.py     decode references for the model, encode results and HTTP bodies (OUTPUT_FORMATS: the one format table)
    results.py   store_result: generated/{voice_id}_{time}_{hex}.{ext} + signed URL
    errors.py    the error hierarchy (stable error_code, retryable)
"""

from .audio import (
    CONTENT_TYPES,
    SUPPORTED_OUTPUT_FORMATS,
    decode_reference,
    decode_reference_async,
    encode,
    encode_async,
)
from .backend import ObjectInfo, Storage
from .cache import CachedReference, CacheStats, ReferenceCache
from .config import StorageConfig
from .errors import (
    InvalidAudioError,
    InvalidObjectNameError,
    InvalidRefUrlError,
    InvalidVoiceIdError,
    LocalStorageError,
    RefAudioForbiddenError,
    RefAudioNotFoundError,
    RefAudioTooLargeError,
    StorageError,
    StorageInputError,
    StorageNotConfiguredError,
    StorageRequestError,
    StorageUnavailableError,
    UnsupportedFormatError,
)
from .factory import open_storage
from .results import ResultStore, StoredResult, result_object_name, store_result
from .retry import RetryPolicy
from .urls import RefLocation, UrlPolicy, parse_ref_url, validate_voice_id

__all__ = [
    "CONTENT_TYPES",
    "SUPPORTED_OUTPUT_FORMATS",
    "CacheStats",
    "CachedReference",
    "InvalidAudioError",
    "InvalidObjectNameError",
    "InvalidRefUrlError",
    "InvalidVoiceIdError",
    "LocalStorageError",
    "ObjectInfo",
    "RefAudioForbiddenError",
    "RefAudioNotFoundError",
    "RefAudioTooLargeError",
    "RefLocation",
    "ReferenceCache",
    "ResultStore",
    "RetryPolicy",
    "Storage",
    "StorageConfig",
    "StorageError",
    "StorageInputError",
    "StorageNotConfiguredError",
    "StorageRequestError",
    "StorageUnavailableError",
    "StoredResult",
    "UnsupportedFormatError",
    "UrlPolicy",
    "decode_reference",
    "decode_reference_async",
    "encode",
    "encode_async",
    "open_storage",
    "parse_ref_url",
    "result_object_name",
    "store_result",
    "validate_voice_id",
]
