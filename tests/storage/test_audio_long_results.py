"""Encoding the longest results the worker makes (MAX_TEXT_CHARS=5000 is about 5 minutes of speech).

One `sf.write` of more than ~87 s of OGG/Vorbis overflows libvorbis's stack and kills the process with SIGSEGV
(libsndfile #1095, python-soundfile #396), so `encode` writes blocks of at most 64k frames. The long encodes run in
a subprocess, in a worker thread as the handler runs them (`encode_async`): a segfault fails the test instead of
killing pytest.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from storage import audio as audio_module
from storage.audio import encode
from testing.voices import ROOT

LONG_S = 300
SAMPLE_RATE = 24000  # the engine's output rate

_ENCODE_LONG = r"""
import io, json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np, soundfile as sf
from storage.audio import encode

fmt, seconds, rate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
t = np.arange(int(seconds * rate)) / rate
wav = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
with ThreadPoolExecutor(1) as pool:  # a worker thread, like encode_async (threads get their own stack)
    data, content_type = pool.submit(encode, wav, rate, fmt).result()
decoded, got_rate = sf.read(io.BytesIO(data), dtype="float32")
tail = decoded[-5 * got_rate:]
peak_hz = float(np.fft.rfftfreq(tail.size, 1 / got_rate)[np.abs(np.fft.rfft(tail)).argmax()])
print(json.dumps({"bytes": len(data), "content_type": content_type, "rate": got_rate,
                  "seconds": decoded.size / got_rate, "tail_rms": float(np.sqrt(np.mean(tail ** 2))),
                  "tail_peak_hz": peak_hz}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ogg", "mp3", "flac", "wav"])
def test_a_300_second_result_encodes_and_decodes_back_to_300_seconds(fmt):
    proc = subprocess.run([sys.executable, "-c", _ENCODE_LONG, fmt, str(LONG_S), str(SAMPLE_RATE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, f"encoder process exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rate"] == SAMPLE_RATE
    assert abs(got["seconds"] - LONG_S) < 0.2, got  # MP3 adds a little encoder padding
    assert got["tail_rms"] > 0.1 and abs(got["tail_peak_hz"] - 220.0) < 2.0, got  # the end was written too


def test_encode_never_hands_libsndfile_more_than_64k_frames_at_once(monkeypatch):
    written: list[int] = []
    real_write = sf.SoundFile.write

    def spy(self, data):
        written.append(len(data))
        return real_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", spy)
    wav = np.zeros(200_000, dtype=np.float32)
    wav[::100] = 0.5
    data, _ = encode(wav, SAMPLE_RATE, "ogg")
    assert written and max(written) <= audio_module._BLOCK_FRAMES == 65536
    assert sum(written) == wav.size
    decoded, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert decoded.size == wav.size


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_short_and_block_boundary_lengths_round_trip(fmt):
    for frames in (1, 65535, 65536, 65537):
        wav = (0.3 * np.sin(2 * np.pi * 440 * np.arange(frames) / SAMPLE_RATE)).astype(np.float32)
        data, _ = encode(wav, SAMPLE_RATE, fmt)
        decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == SAMPLE_RATE
        if fmt in ("wav", "flac"):  # lossless: every frame back, in order
            assert decoded.size == frames
            np.testing.assert_allclose(decoded, wav, atol=1 / 32768 + 1e-6)
        else:
            assert abs(decoded.size - frames) < 0.1 * SAMPLE_RATE
