"""The test tools themselves: testing.gcs_emulator (start, buckets, always stopped) and testing.faultproxy (as a
library and as `python -m`)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from testing.faultproxy import FaultProxy
from testing.gcs_emulator import GcsEmulator

REPO_ROOT = Path(__file__).resolve().parents[2]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_emulator_starts_creates_buckets_and_stops():
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with GcsEmulator(["alpha-bucket"]) as emu:
        emu.put_object("alpha-bucket", "a/b.txt", b"hi", "text/plain")
        assert emu.get_object("alpha-bucket", "a/b.txt") == b"hi"
        with urllib.request.urlopen(f"{emu.url}/storage/v1/b") as response:
            assert b"alpha-bucket" in response.read()
        process, port = emu._process, emu.port
    assert process.poll() is not None and not _port_open(port)
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before  # never touched


def test_emulator_is_killed_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with GcsEmulator() as emu:
            process = emu._process
            raise RuntimeError("boom")
    assert process.poll() is not None


async def test_proxy_counts_by_method_and_path_and_injects_faults(emulator, bucket):
    emulator.put_object(bucket, "x.wav", b"payload", "audio/wav")
    path = f"/storage/v1/b/{bucket}/o/x.wav"
    async with FaultProxy(emulator.url) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + path + "?alt=media") as response:
            assert await response.read() == b"payload"
        proxy.fail_next(1, 503)
        async with client.get(proxy.url + path + "?alt=media") as response:
            assert response.status == 503
        proxy.persistent_status = 500
        async with client.head(proxy.url + path) as response:
            assert response.status == 500
        proxy.clear()
        async with client.get(proxy.url + path + "?alt=media") as response:
            assert response.status == 200
        assert proxy.count("GET", path) == 3 and proxy.count("HEAD", path) == 1 and proxy.count() == 4


async def test_proxy_runs_as_a_module(emulator, bucket):
    emulator.put_object(bucket, "m.wav", b"via module", "audio/wav")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testing.faultproxy", "--target", emulator.url, "--latency-ms", "10", "--fail", "1",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode()
        url = line.split()[3]
        assert line.startswith("fault proxy on http://127.0.0.1:")
        async with aiohttp.ClientSession() as client:
            target = f"{url}/storage/v1/b/{bucket}/o/m.wav?alt=media"
            async with client.get(target) as response:
                assert response.status == 503
            async with client.get(target) as response:
                assert await response.read() == b"via module"
    finally:
        child.terminate()
        await child.wait()


async def test_emulator_runs_as_a_module():
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testing.gcs_emulator", "--bucket", "mod-bucket", cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().strip()
        assert line.startswith("STORAGE_EMULATOR_HOST=http://127.0.0.1:")
        host = line.split("=", 1)[1]
        async with aiohttp.ClientSession() as client, client.get(f"{host}/storage/v1/b/mod-bucket") as response:
            assert response.status == 200
    finally:
        child.terminate()
        assert await asyncio.wait_for(child.wait(), 30) is not None
    assert not _port_open(int(host.rsplit(":", 1)[1]))

