"""Storage settings, read once from the environment and validated (`StorageConfig.from_env`).

Variable                     Default                 Meaning
STORAGE_BACKEND              auto                    `gcs`, `local`, or unset: `gcs` if GCS_BUCKET_NAME is set
GCS_BUCKET_NAME              none (`local` locally)  bucket for results; the default allowed reference bucket
GCS_CREDENTIALS              none                    service-account JSON as a string (as in the seed), or its path
GOOGLE_APPLICATION_CREDENTIALS none                  path to a service-account JSON (when GCS_CREDENTIALS is unset)
STORAGE_EMULATOR_HOST        none                    emulator base URL, e.g. http://127.0.0.1:4443 (no auth sent)
LOCAL_STORAGE_DIR            ./local_storage         local backend root, made absolute: <root>/<bucket>/<object>
ALLOWED_BUCKETS              the configured bucket   comma list of buckets references may come from; `*`: any
ALLOWED_REF_HOSTS            storage.googleapis.com,*.storage.googleapis.com   hosts https references may use
ALLOWED_REF_PREFIXES         any but generated/      comma list of object-name prefixes references may come from
                                                     (e.g. `voices/`); `*`: any object, results included
ALLOW_LOOPBACK_REF_URLS      0                       TEST ONLY: references may use http:// and loopback hosts/ports
MAX_REF_BYTES                52428800 (50 MiB)       byte cap of one reference download, enforced while streaming
AUDIO_CACHE_DIR              /tmp/audio_cache        reference-audio disk cache
AUDIO_CACHE_MAX_BYTES        5368709120 (5 GiB)      cache bound; must be >= MAX_REF_BYTES
SIGNED_URL_TTL_S             86400                   lifetime of result URLs (1..604800, the V4 maximum)
STORAGE_TIMEOUT_S            30                      per attempt: connect timeout and longest silence while reading
STORAGE_RETRY_DEADLINE_S     120                     bound on one whole operation, all retries included
STORAGE_MAX_RETRIES          5                       retries after the first attempt (conn. errors, 408, 429, 5xx)
STORAGE_RETRY_BASE_S         0.5                     first backoff; doubles per retry; full jitter
STORAGE_RETRY_MAX_BACKOFF_S  10                      cap of one backoff
STORAGE_CHECK_ON_START       1                       open_storage proves access (lists one object of the bucket)

Credentials: real GCS needs a service-account key (GCS_CREDENTIALS or GOOGLE_APPLICATION_CREDENTIALS), because
result URLs are V4-signed locally with it. With STORAGE_EMULATOR_HOST credentials are optional: with a key the
URLs are signed (the emulator ignores the signature), without one they are plain emulator URLs.
Every value is read by `storage.env.EnvReader`, with the same rules as the server's variables (an empty value
counts as unset; integers are plain decimal, `1_000` is refused; numbers are finite). Errors name the variable and
the bad value (`MAX_REF_BYTES must be an integer >= 1, got '0'`, after the prefix "GCS not configured correctly: "),
except for credentials, whose content is never shown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .env import EnvReader
from .errors import InvalidRefUrlError, StorageNotConfiguredError
from .urls import RESULTS_PREFIX, UrlPolicy, validate_bucket_name

DEFAULT_ALLOWED_REF_HOSTS = ("storage.googleapis.com", "*.storage.googleapis.com")
DEFAULT_LOCAL_BUCKET = "local"
MAX_SIGNED_URL_TTL_S = 604800


@dataclass(frozen=True)
class StorageConfig:
    backend: str  # "gcs" | "local"
    bucket: str
    credentials_json: str | None = field(default=None, repr=False)
    credentials_file: str | None = None
    emulator_host: str | None = None
    local_dir: Path = Path("local_storage").absolute()
    allowed_buckets: frozenset[str] | None = None  # None: any
    allowed_ref_hosts: tuple[str, ...] = DEFAULT_ALLOWED_REF_HOSTS
    allow_loopback_ref_urls: bool = False
    allowed_ref_prefixes: tuple[str, ...] | None = None  # None: any object but results (storage.urls)
    results_are_references: bool = False  # ALLOWED_REF_PREFIXES=*
    max_ref_bytes: int = 50 * 1024 * 1024
    cache_dir: Path = Path("/tmp/audio_cache")
    cache_max_bytes: int = 5 * 1024**3
    signed_url_ttl_s: int = 86400
    timeout_s: float = 30.0
    retry_deadline_s: float = 120.0
    max_retries: int = 5
    retry_base_s: float = 0.5
    retry_max_backoff_s: float = 10.0
    check_on_start: bool = True

    @property
    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(self.allowed_buckets, self.allowed_ref_hosts, self.allow_loopback_ref_urls,
                         allowed_prefixes=self.allowed_ref_prefixes,
                         refused_prefixes=() if self.results_are_references else (RESULTS_PREFIX,))  # fmt: skip

    @property
    def has_private_key(self) -> bool:
        return bool(self._service_data().get("private_key"))

    @property
    def credentials_description(self) -> str:
        """Safe to log: where credentials come from and the account's e-mail, never the key."""
        if self.credentials_json is None and self.credentials_file is None:
            return "no credentials"
        source = "GCS_CREDENTIALS" if self.credentials_json is not None else f"file {self.credentials_file}"
        email = self._service_data().get("client_email")
        return f"{source} ({email})" if email else source

    def _service_data(self) -> dict:
        if self.credentials_json is not None:
            return json.loads(self.credentials_json)
        if self.credentials_file is not None:
            return json.loads(Path(self.credentials_file).read_text(encoding="utf-8"))
        return {}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StorageConfig:
        """Build and validate. Raises `StorageNotConfiguredError` naming the variable and what is wrong."""
        e = EnvReader(env, StorageNotConfiguredError)
        bucket = e.raw("GCS_BUCKET_NAME")
        backend = e.choice("STORAGE_BACKEND", None, ("gcs", "local")) or ("gcs" if bucket else "local")
        if backend == "gcs" and not bucket:
            raise StorageNotConfiguredError("GCS_BUCKET_NAME is not set (STORAGE_BACKEND=gcs needs a bucket)")
        bucket = bucket or DEFAULT_LOCAL_BUCKET
        try:
            validate_bucket_name(bucket)
        except InvalidRefUrlError:
            raise StorageNotConfiguredError(f"GCS_BUCKET_NAME is not a valid bucket name: {bucket!r}") from None

        emulator_host = _emulator_host(e.raw("STORAGE_EMULATOR_HOST")) if backend == "gcs" else None
        credentials_json, credentials_file = (None, None)
        if backend == "gcs":
            credentials_json, credentials_file = _credentials(e.raw("GCS_CREDENTIALS"),
                                                              e.raw("GOOGLE_APPLICATION_CREDENTIALS"))
            if emulator_host is None and credentials_json is None and credentials_file is None:
                raise StorageNotConfiguredError(
                    "GCS_CREDENTIALS is not set (a service-account key is needed to sign result URLs);"
                    " set GCS_CREDENTIALS to the service-account JSON or GOOGLE_APPLICATION_CREDENTIALS to its path"
                )

        allowed = e.raw("ALLOWED_BUCKETS")
        if allowed is None:
            allowed_buckets: frozenset[str] | None = frozenset({bucket})
        elif allowed.strip() == "*":
            allowed_buckets = None
        else:
            names = [b.strip() for b in allowed.split(",") if b.strip()]
            if not names:
                raise StorageNotConfiguredError(f"ALLOWED_BUCKETS names no bucket: {allowed!r}")
            for name in names:
                try:
                    validate_bucket_name(name)
                except InvalidRefUrlError:
                    raise StorageNotConfiguredError(
                        f"ALLOWED_BUCKETS contains an invalid bucket name: {name!r}") from None
            allowed_buckets = frozenset(names)

        hosts_raw = e.raw("ALLOWED_REF_HOSTS")
        hosts = DEFAULT_ALLOWED_REF_HOSTS if hosts_raw is None else _host_patterns(hosts_raw)

        prefixes_raw = e.raw("ALLOWED_REF_PREFIXES")
        prefixes = None if prefixes_raw is None or prefixes_raw.strip() == "*" else _prefixes(prefixes_raw)

        max_ref_bytes = e.integer("MAX_REF_BYTES", 50 * 1024 * 1024, minimum=1)
        cache_max_bytes = e.integer("AUDIO_CACHE_MAX_BYTES", 5 * 1024**3, minimum=1)
        if cache_max_bytes < max_ref_bytes:
            raise StorageNotConfiguredError(
                f"AUDIO_CACHE_MAX_BYTES ({cache_max_bytes}) must be >= MAX_REF_BYTES ({max_ref_bytes}):"
                " one reference must fit in the cache"
            )
        config = cls(
            backend=backend,
            bucket=bucket,
            credentials_json=credentials_json,
            credentials_file=credentials_file,
            emulator_host=emulator_host,
            local_dir=Path(e.raw("LOCAL_STORAGE_DIR") or "local_storage").expanduser().absolute(),
            allowed_buckets=allowed_buckets,
            allowed_ref_hosts=hosts,
            allow_loopback_ref_urls=e.flag("ALLOW_LOOPBACK_REF_URLS", False),
            allowed_ref_prefixes=prefixes,
            results_are_references=prefixes_raw is not None and prefixes_raw.strip() == "*",
            max_ref_bytes=max_ref_bytes,
            cache_dir=Path(e.raw("AUDIO_CACHE_DIR") or "/tmp/audio_cache").expanduser().absolute(),
            cache_max_bytes=cache_max_bytes,
            signed_url_ttl_s=e.integer("SIGNED_URL_TTL_S", 86400, minimum=1, maximum=MAX_SIGNED_URL_TTL_S),
            timeout_s=e.number("STORAGE_TIMEOUT_S", 30.0, minimum=0.01),
            retry_deadline_s=e.number("STORAGE_RETRY_DEADLINE_S", 120.0, minimum=0.01),
            max_retries=e.integer("STORAGE_MAX_RETRIES", 5, minimum=0, maximum=100),
            retry_base_s=e.number("STORAGE_RETRY_BASE_S", 0.5, minimum=0.0),
            retry_max_backoff_s=e.number("STORAGE_RETRY_MAX_BACKOFF_S", 10.0, minimum=0.0),
            check_on_start=e.flag("STORAGE_CHECK_ON_START", True),
        )
        if config.backend == "gcs" and config.emulator_host is None and not config.has_private_key:
            raise StorageNotConfiguredError(
                f"the credentials in {config.credentials_description} have no private_key: a service-account"
                " key is needed to sign result URLs"
            )
        return config


def _emulator_host(raw: str | None) -> str | None:
    if raw is None:
        return None
    host = raw if "://" in raw else f"http://{raw}"  # as gcloud-aio-storage does
    try:
        parts = urlsplit(host)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise StorageNotConfiguredError(f"STORAGE_EMULATOR_HOST is not a valid URL: {raw!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.path not in ("", "/"):
        raise StorageNotConfiguredError(
            f"STORAGE_EMULATOR_HOST must look like http://host:port, got {raw!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _credentials(raw: str | None, adc_file: str | None) -> tuple[str | None, str | None]:
    """(json_text, file_path): at most one is set. The content is validated; it never appears in messages."""
    if raw is not None:
        if raw.lstrip()[:1] in ("{", "[", '"'):
            _validate_service_json(raw, "GCS_CREDENTIALS")
            return raw, None
        # Not JSON, so a path; the value is still never echoed, in case it is a key pasted in another form.
        return None, _credentials_file(raw, "GCS_CREDENTIALS", show_path=False)
    if adc_file is not None:
        return None, _credentials_file(adc_file, "GOOGLE_APPLICATION_CREDENTIALS", show_path=True)
    return None, None


def _credentials_file(path_text: str, variable: str, show_path: bool) -> str:
    path = Path(path_text).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        where = f": {path}" if show_path else ""
        raise StorageNotConfiguredError(
            f"{variable} is neither service-account JSON nor a readable JSON file path{where} ({reason})"
        ) from None
    _validate_service_json(text, f"the file named by {variable}")
    return str(path.absolute())


def _validate_service_json(text: str, source: str) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # exc.msg and the position describe the syntax error without quoting the document.
        raise StorageNotConfiguredError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise StorageNotConfiguredError(f"{source} must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    known = ("service_account", "authorized_user", "external_account", "impersonated_service_account")
    if kind not in known:
        raise StorageNotConfiguredError(f"{source} has a missing or unsupported 'type'; expected service_account")
    if kind == "service_account":
        missing = [k for k in ("client_email", "private_key") if not isinstance(data.get(k), str) or not data[k]]
        if missing:
            raise StorageNotConfiguredError(f"{source} lacks {', '.join(missing)}")
        _validate_private_key(data["private_key"], source)


def _validate_private_key(pem: str, source: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except Exception:  # cryptography raises several types; none may leak the key
        raise StorageNotConfiguredError(f"{source} has a private_key that is not a valid unencrypted PEM key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise StorageNotConfiguredError(f"{source} has a private_key that is not an RSA key")


def _host_patterns(raw: str) -> tuple[str, ...]:
    patterns = []
    for item in raw.split(","):
        item = item.strip().lower().rstrip(".")
        if not item:
            continue
        body = item[2:] if item.startswith("*.") else item
        if not body or any(ch in body for ch in "*/:@ \t"):
            raise StorageNotConfiguredError(
                f"ALLOWED_REF_HOSTS entries must be hostnames or *.suffix (no scheme, path or port), got {item!r}")
        patterns.append(item)
    if not patterns:
        raise StorageNotConfiguredError(f"ALLOWED_REF_HOSTS names no host: {raw!r}")
    return tuple(patterns)


def _prefixes(raw: str) -> tuple[str, ...]:
    """ALLOWED_REF_PREFIXES: object-name prefixes, such as `voices/` (a name starts with one, as GCS lists them)."""
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise StorageNotConfiguredError(f"ALLOWED_REF_PREFIXES names no prefix: {raw!r}; `*` allows every object")
    for item in items:
        if item.startswith("/") or "*" in item or any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise StorageNotConfiguredError(
                f"ALLOWED_REF_PREFIXES entries must be object-name prefixes such as voices/ (no leading /, no *, "
                f"no control characters), got {item!r}")  # fmt: skip
    return items
