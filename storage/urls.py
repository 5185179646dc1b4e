"""Pure validation of what callers send: reference URLs, voice ids, object names. No I/O happens here.

`parse_ref_url(url, policy)` turns `ref_audio_url` into a `RefLocation` or raises `InvalidRefUrlError`:

- `gs://bucket/object`: the bucket must be allowed (`ALLOWED_BUCKETS`); it is always fetched through the configured
  backend (real GCS, the operator's emulator, or the local folder); the caller never picks the host.
- `https://host/...`: the host must match `ALLOWED_REF_HOSTS`. An exact pattern (`storage.googleapis.com`) takes
  the bucket from the first path segment; a wildcard pattern (`*.storage.googleapis.com`) takes it from the host.
  The bucket must be allowed too. Literal IP hosts must be public (loopback is allowed under the test-only
  `allow_loopback`); hostnames are checked again where they are resolved (`storage._http.GuardedResolver`).
  Only the default port. No user-info. Redirects are never followed (see `storage._http`).
- `http://` only under `allow_loopback`, and only to a loopback host: that is how tests point signed URLs at the
  emulator on 127.0.0.1.

Objects: `allowed_prefixes` (`ALLOWED_REF_PREFIXES`) names the object-name prefixes a reference may come from.
Unset, any object but the worker's own results (`generated/...`, storage.results.RESULT_PREFIX): a caller cannot
use another caller's result as a voice, nor learn from 404/400/200 whether a result exists (the refusal comes
before any I/O). `*` allows every object, results included.

A signed URL and the `gs://` URL of the same object share `RefLocation.cache_key` (`gs://bucket/object`), so the
changing signature query never splits the cache (the cache then proves each https caller's own URL still grants
access before serving a hit: see `storage.cache`). Error messages show URLs without their query (`redact_url`).

Public addresses (`address_is_public`, used for IP-literal hosts here and for every resolved address at connect
time): an address must be `is_global` and not multicast, and IPv6 addresses that carry an IPv4 address are judged
by the IPv4 address they lead to, because a relay or translator will deliver the traffic there:
- `::ffff:a.b.c.d` (IPv4-mapped), `::a.b.c.d` (IPv4-compatible, deprecated), `::ffff:0:a.b.c.d` (IPv4-translated)
  and `64:ff9b::/96` (well-known NAT64 prefix; DNS64 networks resolve GCS to it) -> the last 32 bits;
- `2002::/16` (6to4) -> bits 16..48;
these are public only if the embedded IPv4 address is. Always refused: `2001::/32` (Teredo: its client address,
the last 32 bits XOR 0xffffffff, is reached through relays we do not control, and no storage host lives there)
and `64:ff9b:1::/48` (local-use NAT64, RFC 8215: where the IPv4 address sits depends on the operator's prefix
length). `::` and `::1` are never public. (ISATAP-style interface ids cannot be told apart from ordinary ones and
are judged as plain IPv6.)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import InvalidObjectNameError, InvalidRefUrlError, InvalidVoiceIdError

MAX_URL_CHARS = 8192
MAX_OBJECT_NAME_BYTES = 1024  # GCS's own limit
# The one definition of a voice_id, for the whole worker (server.validation checks job input with it): 1-128 of
# `A-Z a-z 0-9 . _ -`, starting with a letter or digit (so never `.`, `..`, a hidden name or a path).
VOICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_NAMES = frozenset({"localhost"})
RESULTS_PREFIX = "generated/"  # storage.results.RESULT_PREFIX (imported from here, so the two cannot differ)


@dataclass(frozen=True)
class UrlPolicy:
    """What a caller's reference URL may point at.

    `allowed_buckets` None means any bucket (`ALLOWED_BUCKETS=*`). Host patterns are lower-case hostnames or
    `*.suffix` (any depth of subdomain below `suffix`, never `suffix` itself).
    """

    allowed_buckets: frozenset[str] | None
    allowed_hosts: tuple[str, ...] = ("storage.googleapis.com", "*.storage.googleapis.com")
    allow_loopback: bool = False
    # Object-name prefixes references may come from; None: any object outside `refused_prefixes`.
    allowed_prefixes: tuple[str, ...] | None = None
    refused_prefixes: tuple[str, ...] = (RESULTS_PREFIX,)

    def bucket_allowed(self, bucket: str) -> bool:
        return self.allowed_buckets is None or bucket in self.allowed_buckets

    def object_refusal(self, name: str) -> str | None:
        """Why a reference may not be this object (the rule, for the error), or None when it may."""
        if self.allowed_prefixes is not None:
            if not name.startswith(self.allowed_prefixes):
                return f"is not under ALLOWED_REF_PREFIXES ({', '.join(self.allowed_prefixes)})"
            return None
        for prefix in self.refused_prefixes:
            if name.startswith(prefix):
                return (f"is under {prefix}, where the worker stores results: results cannot be references unless "
                        "ALLOWED_REF_PREFIXES allows them")  # fmt: skip
        return None

    def match_host(self, host: str) -> str | None:
        """The pattern `host` matches, or None."""
        for pattern in self.allowed_hosts:
            if pattern.startswith("*."):
                suffix = pattern[1:]  # ".storage.googleapis.com"
                if host.endswith(suffix) and len(host) > len(suffix):
                    return pattern
            elif host == pattern:
                return pattern
        return None

    def address_allowed(self, address: str) -> bool:
        """Whether a caller URL may make us connect to this IP address."""
        return address_is_public(address) or (self.allow_loopback and address_is_loopback(address))


@dataclass(frozen=True)
class RefLocation:
    """Where a reference lives. `fetch_url` (https/http only) carries the signature: it is kept out of repr."""

    scheme: str  # "gs", "https" or "http"
    bucket: str
    object_name: str
    host: str = ""
    fetch_url: str | None = field(default=None, repr=False)

    @property
    def cache_key(self) -> str:
        return f"gs://{self.bucket}/{self.object_name}"

    @property
    def display(self) -> str:
        """A name for messages and logs: never the query of a signed URL."""
        if self.scheme == "gs" or self.fetch_url is None:
            return self.cache_key
        return redact_url(self.fetch_url)


def redact_url(url: str, limit: int = 200) -> str:
    """`url` without query, fragment and user-info, shortened to `limit` characters, safe to print."""
    text = str(url)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc.rpartition("@")[2]
        text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else text.split("?", 1)[0].split("#", 1)[0]
    except ValueError:
        text = text.split("?", 1)[0].split("#", 1)[0]
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_voice_id(voice_id: object) -> str:
    """Return `voice_id` if it matches `VOICE_ID_PATTERN` (a safe file-name-like identifier); else raise
    `InvalidVoiceIdError` (`invalid_voice_id`) with the one message every layer shows."""
    if isinstance(voice_id, str) and VOICE_ID_PATTERN.fullmatch(voice_id):
        return voice_id
    shown = repr(voice_id)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise InvalidVoiceIdError(
        "voice_id must be 1 to 128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit,"
        f" got {shown}"
    )


def validate_bucket_name(bucket: str) -> str:
    """GCS bucket naming rules (3-63 characters, or up to 222 with dots), lower case."""
    ok = (
        isinstance(bucket, str)
        and _BUCKET_RE.fullmatch(bucket) is not None
        and ".." not in bucket
        and all(0 < len(part) <= 63 for part in bucket.split("."))
        and (len(bucket) <= 63 or "." in bucket)
        and not _is_ip_literal(bucket)
    )
    if not ok:
        raise InvalidRefUrlError(f"invalid bucket name {bucket[:80]!r}")
    return bucket


def validate_object_name(name: str) -> str:
    """An object name that is valid in GCS and safe as a relative path: 1-1024 UTF-8 bytes, no control
    characters, no empty, `.` or `..` segments, no leading `/`."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_OBJECT_NAME_BYTES:
        problem = f"is longer than {MAX_OBJECT_NAME_BYTES} bytes"
    elif _CONTROL_RE.search(name) or "\\" in name:
        problem = "contains control characters or backslashes"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "has an empty, '.' or '..' path segment"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem:
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidObjectNameError(f"object name {shown} {problem}")
    return name


_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def address_is_public(address: str) -> bool:
    ip = _ip(address)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL or ip in _TEREDO:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded:
            return all(_global(v4) for v4 in embedded)
    return _global(ip)


def _global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 transition address leads to (empty: not such an address)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64_WKP or ip in _IPV4_TRANSLATED:
        return [low32]
    if ip in _IPV4_COMPATIBLE:
        # `::` and `::1` are in this range too: their "embedded" 0.0.0.0 / 0.0.0.1 are not global either.
        return [low32]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    return []


def address_is_loopback(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def parse_ref_url(url: object, policy: UrlPolicy) -> RefLocation:
    """Validate `ref_audio_url` against `policy` and say where it points. Raises `InvalidRefUrlError`."""
    if not isinstance(url, str):
        raise InvalidRefUrlError(f"ref_audio_url must be a string, got {type(url).__name__}")
    url = url.strip()
    if not url:
        raise InvalidRefUrlError("ref_audio_url is empty")
    if len(url) > MAX_URL_CHARS:
        raise InvalidRefUrlError(f"ref_audio_url is longer than {MAX_URL_CHARS} characters")
    if _CONTROL_RE.search(url) or (" " in url and not url.lower().startswith("gs://")):
        raise InvalidRefUrlError(f"ref_audio_url contains whitespace or control characters: {redact_url(url)}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRefUrlError(f"ref_audio_url is not a valid URL: {redact_url(url)}") from None
    scheme = parts.scheme.lower()
    shown = redact_url(url)
    if scheme == "gs":
        return _parse_gs(parts, port, policy, shown)
    if scheme in ("https", "http"):
        return _parse_https(url, parts, scheme, port, policy, shown)
    raise InvalidRefUrlError(
        f"unsupported ref_audio_url {shown}: use gs://bucket/object or an https signed URL on an allowed host"
        f" ({', '.join(policy.allowed_hosts)})"
    )


def _parse_gs(parts, port, policy: UrlPolicy, shown: str) -> RefLocation:
    if parts.query or parts.fragment or "@" in parts.netloc or port is not None:
        raise InvalidRefUrlError(f"ref_audio_url: gs:// URLs take no user, port, query or fragment: {shown}")
    bucket = parts.netloc
    _check_bucket(bucket, policy, shown)
    object_name = _object_from_path(parts.path[1:] if parts.path.startswith("/") else "", shown, policy)
    return RefLocation("gs", bucket, object_name)


def _parse_https(url: str, parts, scheme: str, port, policy: UrlPolicy, shown: str) -> RefLocation:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidRefUrlError(f"ref_audio_url has no host: {shown}")
    if "@" in parts.netloc:
        raise InvalidRefUrlError(f"ref_audio_url must not carry user information: {shown}")
    loopback_host = host in _LOOPBACK_NAMES or address_is_loopback(host)
    if scheme == "http" and not (policy.allow_loopback and loopback_host):
        raise InvalidRefUrlError(f"ref_audio_url must use https (only https reference URLs are accepted): {shown}")
    if _is_ip_literal(host) and not policy.address_allowed(host):
        raise InvalidRefUrlError(f"ref_audio_url points to a non-public address: {shown}")
    if host in _LOOPBACK_NAMES and not policy.allow_loopback:
        raise InvalidRefUrlError(f"ref_audio_url points to a non-public address: {shown}")
    default_port = 443 if scheme == "https" else 80
    if port is not None and port != default_port and not (policy.allow_loopback and loopback_host):
        raise InvalidRefUrlError(f"ref_audio_url must use the default port: {shown}")
    pattern = policy.match_host(host)
    if pattern is None:
        raise InvalidRefUrlError(
            f"ref_audio_url host {host!r} is not allowed (ALLOWED_REF_HOSTS: {', '.join(policy.allowed_hosts)}):"
            f" {shown}"
        )
    path = parts.path
    if pattern.startswith("*."):
        bucket = host[: -len(pattern) + 1]
        raw_object = path[1:] if path.startswith("/") else ""
    else:
        segments = path.split("/", 2)  # "", bucket, object
        if len(segments) < 3:
            raise InvalidRefUrlError(f"ref_audio_url names no object (expected /bucket/object): {shown}")
        bucket, raw_object = unquote(segments[1]), segments[2]
    _check_bucket(bucket, policy, shown)
    object_name = _object_from_path(unquote(raw_object), shown, policy)
    fetch_url = url.split("#", 1)[0]
    return RefLocation(scheme, bucket, object_name, host=host, fetch_url=fetch_url)


def _check_bucket(bucket: str, policy: UrlPolicy, shown: str) -> None:
    try:
        validate_bucket_name(bucket)
    except InvalidRefUrlError as exc:
        raise InvalidRefUrlError(f"{exc} in ref_audio_url {shown}") from None
    if not policy.bucket_allowed(bucket):
        raise InvalidRefUrlError(f"ref_audio_url bucket {bucket!r} is not in ALLOWED_BUCKETS: {shown}")


def _object_from_path(name: str, shown: str, policy: UrlPolicy) -> str:
    if not name:
        raise InvalidRefUrlError(f"ref_audio_url names no object: {shown}")
    try:
        name = validate_object_name(name)
    except InvalidObjectNameError as exc:
        raise InvalidRefUrlError(f"{exc} in ref_audio_url {shown}") from None
    refusal = policy.object_refusal(name)
    if refusal is not None:
        raise InvalidRefUrlError(f"ref_audio_url object {name!r} {refusal}: {shown}")
    return name


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_ip_literal(host: str) -> bool:
    return _ip(host) is not None
