"""URL policy and voice_id validation: pure checks before any I/O, plus the connect-time DNS guard."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from storage import InvalidRefUrlError, InvalidVoiceIdError, RefLocation, UrlPolicy, parse_ref_url, validate_voice_id
from storage._http import GuardedResolver, make_session
from testing.loopback import LoopbackApp

POLICY = UrlPolicy(frozenset({"voices-bucket"}))
LOOPBACK_POLICY = UrlPolicy(frozenset({"voices-bucket"}), ("127.0.0.1", "localhost", "10.1.2.3"), True)
SIG = "X-Goog-Signature=deadbeefSECRETSIG"


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/",
    "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
    "file:///etc/passwd",
    "ftp://storage.googleapis.com/voices-bucket/a.wav",
    "https://evil.example.com/x.wav",
    f"https://evil.example.com/voices-bucket/x.wav?{SIG}",
    "https://storage.googleapis.com.evil.com/voices-bucket/x.wav",
    "https://storage.googleapis.com@evil.com/voices-bucket/x.wav",
    "https://user:pw@storage.googleapis.com/voices-bucket/x.wav",
    "https://storage.googleapis.com:8443/voices-bucket/x.wav",
    "http://storage.googleapis.com/voices-bucket/x.wav",
    "https://storage.googleapis.com/other-bucket/x.wav",
    "https://other-bucket.storage.googleapis.com/x.wav",
    "https://storage.googleapis.com/voices-bucket/",
    "https://storage.googleapis.com/voices-bucket",
    "https://storage.googleapis.com/voices-bucket/a/../../etc/passwd",
    "https://storage.googleapis.com/voices-bucket/a/%2e%2e/b.wav",
    "https://127.0.0.1/voices-bucket/x.wav",
    "https://[::1]/voices-bucket/x.wav",
    "https://localhost/voices-bucket/x.wav",
    "gs://other-bucket/x.wav",
    "gs://voices-bucket/../secrets.wav",
    "gs://voices-bucket/a/./b.wav",
    "gs://voices-bucket//x.wav",
    "gs://voices-bucket/",
    "gs://voices-bucket",
    "gs://Voices_Bucket/x.wav",
    f"gs://voices-bucket/x.wav?{SIG}",
    "gs://voices-bucket/x\x00.wav",
    "javascript:alert(1)",
    "voices-bucket/x.wav",
    "",
    "   ",
    "https://",
    "https://storage.googleapis.com:99999/voices-bucket/x.wav",
])
def test_refused_urls_raise_a_clear_error(url):
    with pytest.raises(InvalidRefUrlError) as info:
        parse_ref_url(url, POLICY)
    assert info.value.error_code == "invalid_ref_audio_url"
    assert not info.value.retryable
    assert "SECRETSIG" not in str(info.value)


@pytest.mark.parametrize("url", [
    "https://10.1.2.3/voices-bucket/x.wav",  # private stays refused even for tests
    "http://169.254.169.254/voices-bucket/x.wav",
    "http://evil.example.com/voices-bucket/x.wav",  # http only to loopback
])
def test_test_flag_opens_loopback_only(url):
    with pytest.raises(InvalidRefUrlError):
        parse_ref_url(url, LOOPBACK_POLICY)


def test_loopback_http_allowed_under_the_test_flag():
    location = parse_ref_url(f"http://127.0.0.1:4443/voices-bucket/a/b.wav?{SIG}", LOOPBACK_POLICY)
    assert (location.scheme, location.bucket, location.object_name) == ("http", "voices-bucket", "a/b.wav")
    assert location.fetch_url.endswith(SIG)


def test_gs_url():
    location = parse_ref_url("gs://voices-bucket/refs/joão formal.wav", POLICY)
    assert location == RefLocation("gs", "voices-bucket", "refs/joão formal.wav")
    assert location.cache_key == location.display == "gs://voices-bucket/refs/joão formal.wav"


def test_signed_url_path_style_keys_on_the_object_not_the_signature():
    url = f"https://storage.googleapis.com/voices-bucket/refs/a%20b.wav?X-Goog-Date=1&{SIG}"
    location = parse_ref_url(url, POLICY)
    assert (location.bucket, location.object_name) == ("voices-bucket", "refs/a b.wav")
    assert location.cache_key == "gs://voices-bucket/refs/a b.wav"
    assert location.fetch_url == url
    assert "SECRETSIG" not in location.display and "SECRETSIG" not in repr(location)
    resigned = parse_ref_url(url.replace("deadbeef", "cafe"), POLICY)
    assert resigned.cache_key == location.cache_key


def test_signed_url_bucket_in_host():
    location = parse_ref_url(f"https://voices-bucket.storage.googleapis.com/refs/a.wav?{SIG}", POLICY)
    assert (location.bucket, location.object_name) == ("voices-bucket", "refs/a.wav")
    assert location.cache_key == parse_ref_url("gs://voices-bucket/refs/a.wav", POLICY).cache_key


def test_any_bucket_when_allowed_buckets_is_star():
    location = parse_ref_url("gs://someone-else/x.wav", UrlPolicy(None))
    assert location.bucket == "someone-else"


@pytest.mark.parametrize("voice_id", [
    "../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "", "x" * 129, "a\x00b", "é", " a", "-x", ".hidden",
    "a b", "a\nb", None, 5, b"abc",
])
def test_unsafe_voice_ids_are_refused(voice_id):
    with pytest.raises(InvalidVoiceIdError) as info:
        validate_voice_id(voice_id)
    assert info.value.error_code == "invalid_voice_id"


@pytest.mark.parametrize("voice_id", ["joao_formal", "Voice.1-2", "a" * 128, "0"])
def test_safe_voice_ids_pass(voice_id):
    assert validate_voice_id(voice_id) == voice_id


@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused_cleanly(text):
    for candidate in (text, "gs://voices-bucket/" + text, "https://storage.googleapis.com/voices-bucket/" + text):
        try:
            location = parse_ref_url(candidate, POLICY)
        except InvalidRefUrlError:
            continue
        assert location.bucket == "voices-bucket"
        assert all(part not in ("", ".", "..") for part in location.object_name.split("/"))
        assert "\x00" not in location.object_name


@given(st.text(max_size=200))
def test_accepted_voice_ids_are_plain_file_names(text):
    try:
        validate_voice_id(text)
    except InvalidVoiceIdError:
        return
    assert "/" not in text and "\\" not in text and not text.startswith(".") and text.isascii()


class _FakeResolver(aiohttp.abc.AbstractResolver):
    """Resolves every name to one fixed address; records the names asked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        return [{"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


async def test_guard_refuses_allowed_host_resolving_to_private_address():
    resolver = GuardedResolver(POLICY, _FakeResolver("169.254.169.254"))
    with pytest.raises(InvalidRefUrlError, match="non-public"):
        await resolver.resolve("storage.googleapis.com", 443)
    with pytest.raises(InvalidRefUrlError):
        await resolver.resolve("voices-bucket.storage.googleapis.com", 443)


async def test_guard_passes_public_addresses_and_operator_hosts():
    public = GuardedResolver(POLICY, _FakeResolver("142.250.1.1"))
    assert (await public.resolve("storage.googleapis.com", 443))[0]["host"] == "142.250.1.1"
    private = GuardedResolver(POLICY, _FakeResolver("169.254.169.254"), trusted_hosts=frozenset({"emu.local"}))
    assert await private.resolve("metadata.google.internal", 80)  # not caller-reachable: unchecked
    assert await private.resolve("emu.local", 80)


async def test_guard_allows_loopback_only_under_the_test_flag():
    assert await GuardedResolver(LOOPBACK_POLICY, _FakeResolver("127.0.0.1")).resolve("localhost", 80)
    with pytest.raises(InvalidRefUrlError):
        await GuardedResolver(LOOPBACK_POLICY, _FakeResolver("10.0.0.8")).resolve("localhost", 80)


async def test_guarded_session_never_connects_to_a_rebound_name():
    """A real server on loopback, reached through a name the fake DNS maps to 127.0.0.1: refused, never hit."""
    hits = []

    async def handler(request):
        hits.append(request.path)
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await LoopbackApp(app).start()
    port = server.port
    fake_dns = _FakeResolver("127.0.0.1")
    session = make_session(UrlPolicy(None, ("files.example.test",)), resolver=fake_dns)
    try:
        with pytest.raises(InvalidRefUrlError):
            await session.get(f"http://files.example.test:{port}/voices-bucket/x.wav")
        assert fake_dns.asked == ["files.example.test"]
        assert hits == []
    finally:
        await session.close()
        await server.stop()


# IPv6 transition addresses that carry (and lead to) an IPv4 address: judged by that IPv4 address, or refused.
_TRANSITION_NON_PUBLIC = [
    "64:ff9b::7f00:1",  # NAT64 (well-known prefix) of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (metadata server)
    "64:ff9b::c0a8:101",  # NAT64 of 192.168.1.1
    "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): refused outright, even of a public IPv4
    "64:ff9b:1:ffff::a9fe:a9fe",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2002:ac10:1::5",  # 6to4 of 172.16.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1: refused outright
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo, client 8.8.8.8: refused outright too
    "::7f00:1",  # IPv4-compatible ::127.0.0.1
    "::a00:1",  # ::10.0.0.1
    "::a9fe:a9fe",  # ::169.254.169.254
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT) 127.0.0.1
    "::ffff:a9fe:a9fe",  # IPv4-mapped 169.254.169.254 (already refused before; kept as a guard)
    "::",
]


@pytest.mark.parametrize("address", _TRANSITION_NON_PUBLIC)
def test_ipv6_transition_literals_to_private_ipv4_are_refused_by_parsing(address):
    from storage.urls import address_is_public

    assert not address_is_public(address)
    for policy in (POLICY, LOOPBACK_POLICY):
        with pytest.raises(InvalidRefUrlError, match="non-public"):
            parse_ref_url(f"https://[{address}]/voices-bucket/x.wav?{SIG}", UrlPolicy(
                policy.allowed_buckets, (address, *policy.allowed_hosts), policy.allow_loopback))


@pytest.mark.parametrize("address", _TRANSITION_NON_PUBLIC)
async def test_ipv6_transition_addresses_are_refused_at_connect_time(address):
    """An allowed host name that resolves to such an address is refused by the guard, before any connection."""
    dns = _FakeResolver(address)
    with pytest.raises(InvalidRefUrlError, match="non-public"):
        await GuardedResolver(POLICY, dns).resolve("storage.googleapis.com", 443)
    with pytest.raises(InvalidRefUrlError):
        await GuardedResolver(LOOPBACK_POLICY, _FakeResolver(address)).resolve("localhost", 443)
    assert dns.asked == ["storage.googleapis.com"]


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:0:808:808", "::ffff:8.8.8.8",
                                     "2607:f8b0:4004:c07::80", "8.8.8.8"])
def test_transition_addresses_of_public_ipv4_stay_public(address):
    """DNS64 networks resolve storage.googleapis.com into 64:ff9b::/96: those must keep working."""
    from storage.urls import address_is_public

    assert address_is_public(address)
