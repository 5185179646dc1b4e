"""Errors raised by the storage side. Every error carries a stable `error_code` and a `retryable` flag.

    StorageError                     base: storage could not serve a request
    ├── StorageNotConfiguredError    bad or missing configuration, found at start ("GCS not configured correctly")
    ├── StorageInputError            the request itself is wrong (client error: do not retry as is)
    │   ├── InvalidRefUrlError       ref_audio_url refused before any I/O (scheme, host, bucket, address, form)
    │   ├── InvalidVoiceIdError      voice_id is not a safe identifier
    │   ├── InvalidObjectNameError   an object name that GCS or the local backend cannot hold safely
    │   ├── RefAudioNotFoundError    the reference object does not exist (HTTP 404/410, missing file)
    │   ├── RefAudioForbiddenError   the reference object exists but may not be read (HTTP 401/403)
    │   ├── RefAudioTooLargeError    the reference is larger than MAX_REF_BYTES
    │   ├── InvalidAudioError        not audio, empty, corrupt, too short, or absurdly long
    │   └── UnsupportedFormatError   an output format we cannot encode
    ├── StorageRequestError          GCS refused a request for another reason (other 4xx, a redirect)
    ├── StorageUnavailableError      transient faults outlasted the retry budget (retryable later)
    └── LocalStorageError            the local disk failed us (full, permissions)

Messages are written for the caller: they name the object (`gs://bucket/path`, or a URL without its query, so
never the signature of a signed URL) and never contain credentials. Code that converts a lower-level exception
into one of these raises it `from None`, because aiohttp exceptions carry the full URL, signature included.
"""

from __future__ import annotations


class StorageError(Exception):
    error_code = "storage_error"
    retryable = False


class StorageNotConfiguredError(StorageError):
    """Configuration is missing or malformed; raised at start. The message says which variable and why."""

    error_code = "storage_not_configured"

    def __init__(self, reason: str) -> None:
        super().__init__(f"GCS not configured correctly: {reason}")
        self.reason = reason


class StorageInputError(StorageError):
    error_code = "invalid_input"


class InvalidRefUrlError(StorageInputError):
    error_code = "invalid_ref_audio_url"


class InvalidVoiceIdError(StorageInputError):
    error_code = "invalid_voice_id"


class InvalidObjectNameError(StorageInputError):
    error_code = "invalid_object_name"


class RefAudioNotFoundError(StorageInputError):
    error_code = "ref_audio_not_found"


class RefAudioForbiddenError(StorageInputError):
    error_code = "ref_audio_forbidden"


class RefAudioTooLargeError(StorageInputError):
    error_code = "ref_audio_too_large"


class InvalidAudioError(StorageInputError):
    error_code = "invalid_audio"


class UnsupportedFormatError(StorageInputError):
    error_code = "unsupported_output_format"


class StorageRequestError(StorageError):
    error_code = "storage_request_rejected"


class StorageUnavailableError(StorageError):
    error_code = "storage_unavailable"
    retryable = True


class LocalStorageError(StorageError):
    error_code = "local_storage_error"
