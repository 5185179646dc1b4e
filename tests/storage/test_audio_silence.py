"""Silent and near-silent references are refused with the level measured (issue #16); a mostly silent reference
with a short voiced part is accepted.

The level is that of the loudest 50 ms window (RMS, each window's mean removed) of what the model would use: the
mono mix, resampled, trimmed to `max_seconds`. The floor is `min_level_dbfs` (default -50 dBFS; None: no check).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batching.demo import synthetic_voice
from storage import InvalidAudioError, decode_reference, decode_reference_async
from storage.audio import DEFAULT_MIN_LEVEL_DBFS, check_level, reference_level
from testing.sounds import audio_bytes

SR = 22050


def _wav(samples: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _tone(seconds: float, amplitude: float, rate: int = SR, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_an_all_zero_reference_is_refused_with_its_level():
    with pytest.raises(InvalidAudioError) as info:
        decode_reference(_wav(np.zeros(3 * SR)), SR, 30.0)
    message = str(info.value)
    assert info.value.error_code == "invalid_audio" and info.value.retryable is False
    assert "silent" in message and "peak -inf dBFS" in message and "loudest 50 ms window -inf dBFS" in message
    assert "at least -50 dBFS is needed" in message


def test_a_reference_below_the_floor_is_refused_and_the_message_says_how_far_below():
    # A tone peaking at -60 dBFS: its loudest window's RMS is 3 dB lower, -63 dBFS.
    with pytest.raises(InvalidAudioError) as info:
        decode_reference(_wav(_tone(3.0, 10 ** (-60 / 20))), SR, 30.0)
    message = str(info.value)
    assert "peak -60.0 dBFS" in message or "peak -59.9 dBFS" in message, message
    assert "RMS of the loudest 50 ms window -63.0 dBFS" in message, message


@pytest.mark.parametrize("noise", ["dither", "dc_offset"])
def test_dither_and_a_constant_offset_read_as_silence(noise):
    rng = np.random.default_rng(0)
    samples = {"dither": rng.integers(-1, 2, 3 * SR) / 32768,  # +-1 LSB of 16-bit audio (~-95 dBFS)
               "dc_offset": np.full(3 * SR, 0.05)}[noise]  # fmt: skip
    with pytest.raises(InvalidAudioError, match="silent"):
        decode_reference(_wav(samples), SR, 30.0)


def test_mostly_silence_with_a_short_voiced_part_is_accepted():
    """20 s of digital silence around 0.4 s of a quiet voice: its overall RMS (~-61 dBFS) is far under the floor,
    but the loudest window (~-42 dBFS) is the voice's own level, and clears it."""
    samples = np.zeros(20 * SR, dtype=np.float32)
    voice = 0.05 * synthetic_voice(0.4)
    samples[9 * SR: 9 * SR + voice.size] = voice
    wav = decode_reference(_wav(samples), SR, 30.0)
    assert wav.size == samples.size
    overall_db = 10 * math.log10(np.mean(wav.astype(np.float64) ** 2))
    peak_db, loudest_db = reference_level(wav, SR)
    assert overall_db < DEFAULT_MIN_LEVEL_DBFS - 5 and loudest_db > DEFAULT_MIN_LEVEL_DBFS + 5, (overall_db, loudest_db)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start_s=st.floats(0.0, 4.9), length_s=st.floats(0.05, 1.0), level_db=st.floats(-75.0, -10.0),
       rate=st.sampled_from([16000, 22050, 44100, 48000]))  # fmt: skip
def test_a_burst_anywhere_is_judged_by_its_own_level(start_s, length_s, level_db, rate):
    """A tone burst of 50 ms to 1 s, anywhere in 5 s of silence (across window edges, at the very end): accepted
    when its RMS is 2 dB or more above the floor, refused when it is under the floor."""
    samples = np.zeros(5 * rate, dtype=np.float32)
    burst = _tone(length_s, math.sqrt(2) * 10 ** (level_db / 20), rate)  # a sine's RMS is its amplitude / sqrt(2)
    start = min(int(start_s * rate), samples.size - burst.size)
    samples[start: start + burst.size] = burst
    data = _wav(samples, rate, subtype="FLOAT")
    if level_db >= DEFAULT_MIN_LEVEL_DBFS + 2:
        decode_reference(data, SR, 30.0)
    elif level_db < DEFAULT_MIN_LEVEL_DBFS:
        with pytest.raises(InvalidAudioError, match="silent"):
            decode_reference(data, SR, 30.0)


def test_a_short_burst_at_the_very_end_is_measured():
    samples = np.zeros(3 * SR, dtype=np.float32)
    samples[-int(0.03 * SR):] = _tone(0.03, 0.3)  # 30 ms, shorter than one window, in the last samples
    decode_reference(_wav(samples), SR, 30.0)


def test_only_what_the_model_uses_is_measured():
    """XTTS uses the first max_seconds: a voice that starts after them gives the model silence."""
    samples = np.concatenate([np.zeros(5 * SR, dtype=np.float32), synthetic_voice(3.0)])
    with pytest.raises(InvalidAudioError, match="silent"):
        decode_reference(_wav(samples), SR, 4.0)
    assert decode_reference(_wav(samples), SR, 30.0).size == samples.size


def test_stereo_channels_that_cancel_are_silence_for_the_model():
    voice = synthetic_voice(3.0)
    with pytest.raises(InvalidAudioError, match="silent"):
        decode_reference(_wav(np.stack([voice, -voice], axis=1)), SR, 30.0)


def test_the_floor_is_a_parameter_and_none_turns_the_check_off():
    quiet = _wav(_tone(3.0, 10 ** (-40 / 20)))  # loudest window ~-43 dBFS
    assert decode_reference(quiet, SR, 30.0).size == 3 * SR  # above the default floor
    with pytest.raises(InvalidAudioError, match=r"-43\.0 dBFS; at least -30 dBFS is needed"):
        decode_reference(quiet, SR, 30.0, min_level_dbfs=-30)
    silent = _wav(np.zeros(3 * SR))
    assert not decode_reference(silent, SR, 30.0, min_level_dbfs=None).any()
    assert not decode_reference(silent, SR, 30.0, min_level_dbfs=-math.inf).any()


async def test_the_async_wrapper_passes_the_floor_through():
    quiet = _wav(_tone(3.0, 10 ** (-40 / 20)))
    with pytest.raises(InvalidAudioError, match="at least -30 dBFS"):
        await decode_reference_async(quiet, SR, 30.0, min_level_dbfs=-30)
    assert (await decode_reference_async(quiet, SR, 30.0)).size == 3 * SR


def test_check_level_on_its_own():
    check_level(_tone(1.0, 0.1), SR, -30.0)
    with pytest.raises(InvalidAudioError):
        check_level(_tone(1.0, 0.001), SR, -30.0)
    assert reference_level(np.zeros(0, dtype=np.float32), SR) == (-math.inf, -math.inf)


@pytest.mark.parametrize("make", [
    lambda: _wav(synthetic_voice(3.0, f0=140.0)),  # tests, bench and the worker's warm-up
    lambda: _wav(synthetic_voice(3.0, f0=95.0, seed=2)),
    lambda: audio_bytes("WAV"), lambda: audio_bytes("OGG"), lambda: audio_bytes("MP3"),  # storage fixtures
])  # fmt: skip
def test_the_references_tests_and_benchmarks_use_clear_the_floor_by_far(make):
    wav = decode_reference(make(), SR, 30.0)
    assert reference_level(wav, SR)[1] > DEFAULT_MIN_LEVEL_DBFS + 25
