"""Property-based fuzzing of the reference decoder: whatever the bytes, a clear InvalidAudioError or audio."""

import io

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.audio import decode_reference
from storage.errors import InvalidAudioError


def _valid(fmt: str, subtype: str | None = None) -> bytes:
    t = np.arange(22050 * 2) / 22050
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = [_valid("WAV", "PCM_16"), _valid("FLAC"), _valid("OGG", "VORBIS"), _valid("MP3")]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_clear_error(data: bytes) -> None:
    try:
        wav = decode_reference(data, 22050, 30.0)
    except InvalidAudioError as exc:
        assert str(exc)  # a message a caller can read
        assert exc.error_code == "invalid_audio"
        return
    assert wav.dtype == np.float32 and wav.ndim == 1 and len(wav) >= 22050
    assert np.isfinite(wav).all()


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_give_a_clear_error_or_audio(data):
    _decode_or_clear_error(data)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                     min_size=1, max_size=16), st.integers(0, 10**6))  # fmt: skip
def test_corrupted_real_files_give_a_clear_error_or_audio(which, flips, cut):
    data = bytearray(SEEDS[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    _decode_or_clear_error(bytes(data[: max(1, cut % (len(data) + 1))]))
