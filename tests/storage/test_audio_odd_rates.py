"""Resampling cost is bounded for every sample rate a reference may declare (1,000..384,000 Hz).

torchaudio's sinc resampler builds a kernel of `new * (orig + 2 * width)` taps, the rates reduced by their gcd: a
48 KB WAV declaring 16,001 Hz cost 5.7 GiB and 26 s of CPU, 383,999 Hz about 140 GB. `decode_reference` keeps
torchaudio (XTTS's own `load_audio`) where the kernel is small, which covers every standard rate, and resamples
any other rate with soxr.

The memory test decodes in a subprocess (torch allocates outside Python's heap, so tracemalloc cannot see it) that
reports, for each decode, its peak RSS (VmHWM, reset before each decode) above the RSS it started from, under an
address-space cap so that a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching.demo import synthetic_voice
from storage import audio as audio_module
from storage.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, decode_reference
from testing.voices import ROOT

XTTS_SR = 22050
MAX_REF_S = 30.0  # the engine's max_ref_len: decode reads 30.25 s at most
ODD_RATES = [4001, 16001, 44101, 383_999]
# The rates whose torchaudio kernel is the largest still allowed (most taps; longest filter per output sample).
WORST_TORCHAUDIO_RATES = [81_942, 366_930]
STANDARD_RATES = [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000,
                  352800, 384000]  # fmt: skip
PEAK_EXTRA_MB = 500
_real_resample = F.resample
DECODE_CPU_S = 5.0  # measured ~0.1-0.9 s; before the fix 16,001 Hz took 26 s (and 4001 Hz 9 s for 1.5 s of audio)


def _wav(rate: int, seconds: float, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    n = int(rate * seconds)
    t = np.arange(n) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(rate).standard_normal(n)
    buf = io.BytesIO()
    frames = mono[:, None] * np.ones(channels, dtype=np.float32) if channels > 1 else mono
    sf.write(buf, frames.astype(np.float32), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


_MEASURE = r"""
import json, resource, sys, time
import numpy as np
from storage.audio import decode_reference
import soxr, torch, torchaudio.functional  # noqa: F401  (imports are not the decode's cost)

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

def reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS. Without it: ru_maxrss.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

# A warm-up decode at a standard rate (torch's lazy initialisation), then a cap on the address space: a decode
# that wants gigabytes fails here rather than taking the machine down.
decode_reference(sys.argv[1], 22050, 30.0)
cap = status("VmSize") + 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for path in sys.argv[2:]:
    resettable = reset_peak()
    before = status("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        wav = decode_reference(path, 22050, 30.0)
        result = {"seconds": wav.size / 22050, "finite": bool(np.isfinite(wav).all())}
    except BaseException as exc:
        result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    peak = status("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(path=path, wall_s=round(time.perf_counter() - wall, 3), cpu_s=round(time.process_time() - cpu, 3),
                  peak_extra_mb=round((peak - before) / 2**20, 1))
    wav = None
    print(json.dumps(result), flush=True)
"""


@pytest.mark.slow
def test_odd_rates_decode_in_bounded_memory_and_time(tmp_path):
    """31 s references (the most a decode reads, and more): the 4 rates of the bug report at 1 and 16 channels,
    and the worst rates torchaudio still handles. Each decode's peak RSS stays under 500 MB above its start."""
    warm = tmp_path / "warm.wav"
    warm.write_bytes(_wav(44100, 1.5))
    cases = [(r, 1) for r in ODD_RATES + WORST_TORCHAUDIO_RATES] + [(16001, 16), (44101, 16)]
    paths = []
    for rate, channels in cases:
        path = tmp_path / f"ref_{rate}_{channels}ch.wav"
        path.write_bytes(_wav(rate, 31.0, channels))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(warm), *paths], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stdout + proc.stderr[-2000:]
    for (rate, channels), got in zip(cases, results, strict=True):
        print(f"{rate} Hz x {channels} ch: {got}")
        assert "error" not in got, got
        assert got["seconds"] == MAX_REF_S and got["finite"]
        assert got["cpu_s"] < DECODE_CPU_S, (rate, channels, got)
        assert got["peak_extra_mb"] < PEAK_EXTRA_MB, (rate, channels, got)


@pytest.mark.parametrize("rate", STANDARD_RATES)
def test_standard_rates_still_use_torchaudio_like_xtts(rate, monkeypatch):
    """XTTS conditions on `torchaudio.functional.resample`'s output: every standard rate keeps it bit for bit."""
    called = []
    monkeypatch.setattr("soxr.resample", lambda *a, **k: called.append(a) or pytest.fail("soxr used"))
    data = _wav(rate, 1.5)
    wav = decode_reference(data, XTTS_SR, MAX_REF_S)
    full, _ = sf.read(io.BytesIO(data), dtype="float32")
    expected = full if rate == XTTS_SR else F.resample(torch.from_numpy(full)[None], rate, XTTS_SR)[0].numpy()
    np.testing.assert_array_equal(wav, np.clip(expected, -1, 1))
    assert called == []


@pytest.mark.parametrize(("orig", "new"), [(44100, 22050), (48000, 22050), (16000, 22050), (8000, 16000),
                                           (384000, 22050), (8020, 22050), (22050, 16000)])  # fmt: skip
def test_the_kernel_size_formula_matches_torchaudio(orig, new):
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    kernel, _width = _get_sinc_resample_kernel(orig, new, math.gcd(orig, new), dtype=torch.float32)
    assert kernel.numel() == audio_module._torchaudio_kernel_taps(orig, new)


def test_an_odd_rate_resampled_by_soxr_matches_torchaudio_closely():
    """8,020 Hz is just past torchaudio's budget (1.8M taps, still affordable here to compare): soxr's result
    differs from torchaudio's by less than -40 dB, the same conditioning audio for the model."""
    rate = 8020
    assert audio_module._torchaudio_kernel_taps(rate, XTTS_SR) > audio_module._TORCHAUDIO_MAX_KERNEL
    voice = synthetic_voice(2.0, sr=rate)
    buf = io.BytesIO()
    sf.write(buf, voice, rate, format="WAV", subtype="FLOAT")
    got = decode_reference(buf.getvalue(), XTTS_SR, MAX_REF_S)
    reference = F.resample(torch.from_numpy(voice)[None], rate, XTTS_SR)[0].numpy()
    assert abs(got.size - reference.size) <= 1
    n = min(got.size, reference.size)
    inner = slice(200, n - 200)  # edges: each resampler pads differently
    diff = got[:n][inner] - reference[:n][inner]
    relative_db = 10 * np.log10(np.mean(diff**2) / np.mean(reference[inner] ** 2))
    assert relative_db < -40, relative_db


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.one_of(st.integers(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),  # odd rates: nearly all go to soxr
                      st.sampled_from([MIN_SAMPLE_RATE, MAX_SAMPLE_RATE, *STANDARD_RATES, *WORST_TORCHAUDIO_RATES])),
       channels=st.integers(1, MAX_CHANNELS),
       seconds=st.floats(1.05, 4.0), subtype=st.sampled_from(["PCM_16", "FLOAT"]))  # fmt: skip
def test_any_accepted_rate_channels_and_length_decode_quickly_to_the_right_length(rate, channels, seconds, subtype):
    seconds = max(1.05, min(seconds, 3e6 / (rate * channels)))  # keep the test's own data small
    data = _wav(rate, seconds, channels, subtype)
    with sf.SoundFile(io.BytesIO(data)) as info:
        expected_s = info.frames / rate
    kernels = []  # the kernel of every torchaudio call: never more than the budget (8 MB per float64 temporary)

    def recording_resample(waveform, orig_freq, new_freq, *args, **kwargs):
        kernels.append(audio_module._torchaudio_kernel_taps(orig_freq, new_freq))
        return _real_resample(waveform, orig_freq, new_freq, *args, **kwargs)

    started = time.process_time()
    with mock.patch("torchaudio.functional.resample", recording_resample):
        wav = decode_reference(data, XTTS_SR, MAX_REF_S)
    cpu_s = time.process_time() - started
    assert cpu_s < 2.0, (rate, channels, seconds, cpu_s)
    assert wav.dtype == np.float32 and np.isfinite(wav).all()
    assert abs(wav.size / XTTS_SR - expected_s) < 0.01
    assert all(k <= audio_module._TORCHAUDIO_MAX_KERNEL for k in kernels), (rate, kernels)
