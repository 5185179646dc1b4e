"""The reference cache's access rule through the real parts: GcsStorage, its aiohttp session and URL guard,
V4 URLs signed with a real key, fake-gcs-server holding the object.

fake-gcs-server does not verify signatures, so a loopback stand-in for GCS's signature check sits in front of it
(`SignatureGate`): it verifies the V4 signature with the service account's public key (method, path, query,
host), refuses expired URLs, answers 403 like GCS for either, and otherwise relays the request (Range included)
to the emulator. It is a test double for GCS's own check, nothing more.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from gcloud.aio.storage import blob as gcloud_blob

from storage import RefAudioForbiddenError, ReferenceCache, open_storage
from testing.loopback import LoopbackApp


class SignatureGate:
    def __init__(self, upstream: str, public_key) -> None:
        self.upstream = upstream
        self.public_key = public_key
        self.seen: list[tuple[str, str | None, int]] = []  # (method, Range header, status answered)

    def _valid(self, request: web.Request) -> bool:
        # Like GCS: the canonical query is rebuilt from the decoded parameters (sorted, RFC 3986 encoded), so
        # how a client happens to percent-encode them on the wire does not matter.
        params = {k: v[0] for k, v in parse_qs(request.query_string).items()}
        signature = params.pop("X-Goog-Signature", "")
        canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                                   for k, v in sorted(params.items()))
        try:
            signed_at = datetime.strptime(params["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            if signed_at.timestamp() + int(params["X-Goog-Expires"]) < time.time():
                return False  # expired
            scope = params["X-Goog-Credential"].split("/", 1)[1]
            canonical_request = "\n".join([request.method, request.raw_path.split("?", 1)[0], canonical_query,
                                           f"host:{gcloud_blob.HOST.lower()}\n", "host", "UNSIGNED-PAYLOAD"])
            string_to_sign = "\n".join(["GOOG4-RSA-SHA256", params["X-Goog-Date"], scope,
                                        hashlib.sha256(canonical_request.encode()).hexdigest()])
            self.public_key.verify(bytes.fromhex(signature), string_to_sign.encode(), padding.PKCS1v15(),
                                   hashes.SHA256())
            return True
        except (KeyError, ValueError, InvalidSignature):
            return False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        range_header = request.headers.get("Range")
        if not self._valid(request):
            self.seen.append((request.method, range_header, 403))
            return web.Response(status=403, text="SignatureDoesNotMatch")
        headers = {"Range": range_header} if range_header else {}
        async with aiohttp.ClientSession() as session, session.get(
                self.upstream + request.raw_path, headers=headers) as upstream:
            body = await upstream.read()
            self.seen.append((request.method, range_header, upstream.status))
            return web.Response(status=upstream.status, body=body)


@pytest.fixture
async def gate(emulator, service_account):
    checker = SignatureGate(emulator.url, service_account.public_key)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", checker.handle)
    server = await LoopbackApp(app).start()
    checker.url = server.url
    yield checker
    await server.stop()


def through(gate: SignatureGate, signed_url: str) -> str:
    """The signed URL, sent to the gate instead of straight to the emulator (the signature is unchanged)."""
    parts = urlsplit(signed_url)
    return f"{gate.url}{parts.path}?{parts.query}"


def forge(url: str) -> str:
    head, _, signature = url.partition("&X-Goog-Signature=")
    return f"{head}&X-Goog-Signature={'0' * len(signature)}"


async def test_a_forged_or_expired_signature_after_a_valid_one_is_refused_not_served_from_cache(
        make_config, gate, bucket, make_audio, tmp_path):
    data = make_audio("WAV", seconds=1.0)
    async with await open_storage(make_config()) as storage:
        await storage.upload(data, "refs/maria.wav", "audio/wav")
        cache = ReferenceCache(tmp_path / "cache", 10_000_000, storage)
        valid = through(gate, await storage.signed_url("refs/maria.wav", 600))
        short_lived = through(gate, await storage.signed_url("refs/maria.wav", 1))

        async with cache.use("maria", valid) as first:
            assert not first.hit and first.path.read_bytes() == data
        assert gate.seen == [("GET", None, 200)]

        # Same voice_id, same object, forged signature: refused with what a download of it gives.
        gate.seen.clear()
        with pytest.raises(RefAudioForbiddenError) as refused:
            async with cache.use("maria", forge(valid)):
                pytest.fail("served a cached file to a forged URL")
        with pytest.raises(RefAudioForbiddenError) as downloaded:
            await storage.download(forge(valid), tmp_path / "direct")
        assert refused.value.error_code == downloaded.value.error_code == "ref_audio_forbidden"
        assert str(refused.value) == str(downloaded.value) and "X-Goog-Signature" not in str(refused.value)
        assert gate.seen[0] == ("GET", "bytes=0-0", 403)  # the check: one ranged GET, refused by the gate

        # An expired (validly signed) URL: refused too.
        time.sleep(1.2)
        gate.seen.clear()
        with pytest.raises(RefAudioForbiddenError):
            await cache.get("maria", short_lived)
        assert gate.seen == [("GET", "bytes=0-0", 403)]

        # A freshly signed URL of the same object: a hit, after one 1-byte ranged GET.
        gate.seen.clear()
        resigned = through(gate, await storage.signed_url("refs/maria.wav", 600))
        async with cache.use("maria", resigned) as again:
            assert again.hit and again.path == first.path and again.path.read_bytes() == data
        assert len(gate.seen) == 1 and gate.seen[0][:2] == ("GET", "bytes=0-0") and gate.seen[0][2] in (200, 206)

        # gs:// stays governed by ALLOWED_BUCKETS: a hit with no request at all.
        gate.seen.clear()
        assert (await cache.get("maria", f"gs://{bucket}/refs/maria.wav")).hit and gate.seen == []
        assert cache.downloads == 1 and (cache.access_checks, cache.access_refusals) == (3, 2)
