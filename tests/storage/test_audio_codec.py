"""Decoding references (every input format, bad input, bounds) and encoding results."""

from __future__ import annotations

import io
import struct
import threading

import numpy as np
import pytest
import soundfile as sf

from storage import (
    SUPPORTED_OUTPUT_FORMATS,
    InvalidAudioError,
    UnsupportedFormatError,
    decode_reference,
    decode_reference_async,
    encode,
    encode_async,
)
from storage import audio as audio_module

XTTS_SR = 22050


def _peak_hz(wav: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.fft.rfftfreq(wav.size, 1 / sample_rate)[spectrum.argmax()])


def _wav_header(sample_rate: int, channels: int, bits: int, data_bytes: int) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", data_bytes))


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_each_format_decodes_to_mono_float32_at_the_model_rate(fmt, make_audio, tmp_path):
    data = make_audio(fmt, seconds=2.0, sample_rate=24000)
    path = tmp_path / f"ref.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        wav = decode_reference(source, XTTS_SR, 30.0)
        assert wav.dtype == np.float32 and wav.ndim == 1
        assert abs(wav.size - 2 * XTTS_SR) < 0.1 * XTTS_SR  # MP3 adds encoder padding
        assert np.abs(wav).max() <= 1.0
        assert abs(_peak_hz(wav, XTTS_SR) - 220.0) < 5.0  # it is the tone, not noise


def test_stereo_is_mixed_to_mono(make_audio):
    wav = decode_reference(make_audio("WAV", seconds=1.5, sample_rate=XTTS_SR, channels=2), XTTS_SR, 30.0)
    mono = decode_reference(make_audio("WAV", seconds=1.5, sample_rate=XTTS_SR, channels=1), XTTS_SR, 30.0)
    assert wav.shape == mono.shape
    np.testing.assert_allclose(wav, mono, atol=1e-4)


def test_long_reference_is_trimmed_like_xtts(make_audio):
    """XTTS resamples the whole file, clips, then keeps the first max_ref_length seconds."""
    import torch
    import torchaudio.functional as F

    data = make_audio("WAV", seconds=34.0, sample_rate=44100)
    wav = decode_reference(data, XTTS_SR, 30.0)
    assert wav.size == 30 * XTTS_SR
    full, rate = sf.read(io.BytesIO(data), dtype="float32")
    expected = F.resample(torch.from_numpy(full).unsqueeze(0), rate, XTTS_SR).clamp(-1, 1)[0, : 30 * XTTS_SR]
    np.testing.assert_allclose(wav, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"hello, this is not audio" * 40, "not a valid WAV, FLAC, OGG/Vorbis or MP3"),
    (b'{"json": true}', "not a valid"),
    (bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8)), "not a valid"),
])
def test_non_audio_gives_a_clear_error(data, message):
    with pytest.raises(InvalidAudioError, match=message) as info:
        decode_reference(data, XTTS_SR, 30.0)
    assert info.value.error_code == "invalid_audio"


def test_empty_file_gives_a_clear_error(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InvalidAudioError, match="empty"):
        decode_reference(empty, XTTS_SR, 30.0)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_truncated_files_give_a_clear_error(fmt, make_audio):
    data = make_audio(fmt, seconds=2.0)
    with pytest.raises(InvalidAudioError):
        decode_reference(data[:100], XTTS_SR, 30.0)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_corrupt_payload_gives_a_clear_error(fmt, make_audio):
    data = bytearray(make_audio(fmt, seconds=2.0))
    third = len(data) // 3
    data[third:] = np.random.default_rng(0).integers(0, 256, len(data) - third, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidAudioError, match="not a valid"):
        decode_reference(bytes(data), XTTS_SR, 30.0)


def test_shorter_than_one_second_is_refused(make_audio):
    with pytest.raises(InvalidAudioError, match=r"0\.50 s long; at least 1 s"):
        decode_reference(make_audio("WAV", seconds=0.5), XTTS_SR, 30.0)


def test_nan_samples_are_refused():
    buffer = io.BytesIO()
    samples = np.full(24000 * 2, np.nan, dtype=np.float32)
    sf.write(buffer, samples, 24000, format="WAV", subtype="FLOAT")
    with pytest.raises(InvalidAudioError, match="NaN"):
        decode_reference(buffer.getvalue(), XTTS_SR, 30.0)


def test_declared_length_bomb_is_refused_before_decoding(make_audio, monkeypatch):
    """A 2-second FLAC whose header claims 2**36 samples: refused from the header alone."""
    data = bytearray(make_audio("FLAC", seconds=2.0))
    assert data[:4] == b"fLaC"
    packed = int.from_bytes(data[18:26], "big") | ((1 << 36) - 1)  # STREAMINFO total_samples field
    data[18:26] = packed.to_bytes(8, "big")
    reads = []
    monkeypatch.setattr(audio_module, "_read_mono", lambda *args: reads.append(args))
    with pytest.raises(InvalidAudioError, match=r"declares \d+ s; at most 600 s"):
        decode_reference(bytes(data), XTTS_SR, 30.0)
    assert reads == []


def test_genuinely_long_file_is_refused_from_its_header():
    eleven_minutes = 11 * 60 * 8000
    data = _wav_header(8000, 1, 16, eleven_minutes * 2) + bytes(eleven_minutes * 2)
    with pytest.raises(InvalidAudioError, match="declares 660 s"):
        decode_reference(data, XTTS_SR, 30.0)


def test_declared_limit_is_a_parameter(make_audio):
    with pytest.raises(InvalidAudioError, match="at most 3 s"):
        decode_reference(make_audio("WAV", seconds=5.0), XTTS_SR, 30.0, max_declared_seconds=3.0)


@pytest.mark.parametrize(("rate", "channels", "message"), [
    (1, 1, "implausible sample rate"),
    (8000, 200, "implausible 200 channels"),
])
def test_implausible_headers_are_refused(rate, channels, message):
    data = _wav_header(rate, channels, 16, 64000) + bytes(64000)
    with pytest.raises(InvalidAudioError, match=message):
        decode_reference(data, XTTS_SR, 30.0)


@pytest.mark.parametrize("fmt", SUPPORTED_OUTPUT_FORMATS)
def test_encode_round_trips_each_output_format(fmt):
    sample_rate = 24000
    t = np.arange(sample_rate * 2) / sample_rate
    wav = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data, content_type = encode(wav, sample_rate, fmt)
    assert content_type == {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}[fmt]
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == sample_rate
    assert abs(decoded.size - wav.size) < 0.1 * sample_rate
    assert abs(_peak_hz(decoded, rate) - 440.0) < 5.0


def test_encode_defaults_to_wav_and_clips():
    data, content_type = encode(np.array([2.0, -3.0, 0.5, np.nan], dtype=np.float32), 24000)
    assert content_type == "audio/wav" and data[:4] == b"RIFF"
    decoded, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert decoded.max() <= 1.0 and decoded.min() >= -1.0 and np.isfinite(decoded).all()


@pytest.mark.parametrize("fmt", ["aac", "exe", "", "wav; rm -rf /"])
def test_unsupported_output_format(fmt):
    with pytest.raises(UnsupportedFormatError) as info:
        encode(np.zeros(100, dtype=np.float32), 24000, fmt)
    assert info.value.error_code == "unsupported_output_format"


def test_format_names_are_case_insensitive():
    assert encode(np.zeros(2400, dtype=np.float32), 24000, "FLAC")[1] == "audio/flac"


async def test_async_wrappers_run_off_the_event_loop_thread(make_audio, monkeypatch):
    loop_thread = threading.get_ident()
    seen = []
    real_decode, real_encode = audio_module.decode_reference, audio_module.encode

    def spy_decode(*args, **kwargs):
        seen.append(threading.get_ident())
        return real_decode(*args, **kwargs)

    def spy_encode(*args, **kwargs):
        seen.append(threading.get_ident())
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(audio_module, "decode_reference", spy_decode)
    monkeypatch.setattr(audio_module, "encode", spy_encode)
    wav = await decode_reference_async(make_audio("WAV", seconds=1.5, sample_rate=XTTS_SR), XTTS_SR, 30.0)
    data, content_type = await encode_async(wav, XTTS_SR, "flac")
    assert wav.size == int(1.5 * XTTS_SR) and content_type == "audio/flac" and data[:4] == b"fLaC"
    assert len(seen) == 2 and loop_thread not in seen
