"""Audio in and out: decode a reference (WAV, FLAC, OGG/Vorbis, MP3) for the model; encode a result.

`decode_reference` mirrors XTTS's `load_audio` + `get_conditioning_latents`: mix to mono (channel mean), resample
with `torchaudio.functional.resample`, clip to [-1, 1], keep the first `max_seconds`. It is bounded: the header's
frame count, rate and channels are checked before any sample is decoded (a file declaring more than
`max_declared_seconds` is refused), and only the first `max_seconds` (plus a short resampler margin) are decoded.

Resampling cost is bounded for every accepted rate. torchaudio's sinc resampler builds a kernel of
`new * (orig + 2 * width)` taps, where `orig / new` is the rate ratio reduced by its gcd: tiny for the usual rates
(48 kHz -> 22.05 kHz: 147 x 348) but gigabytes for an odd one (16,001 Hz -> 22,050 Hz: 22,050 x 16,015, 5.7 GiB and
half a minute of CPU). So torchaudio, exactly as XTTS would, resamples only where that kernel has at most
`_TORCHAUDIO_MAX_KERNEL` taps (every standard rate from 8 kHz to 384 kHz does); any other rate goes through soxr
(a polyphase resampler whose cost does not depend on the ratio's gcd), at its highest quality.

A reference that is silent or nearly so is refused: the loudest `_LEVEL_WINDOW_S` window of what the model would
use (after mono mix, resampling and trimming; each window's mean removed, so a DC offset is not a voice) must reach
`min_level_dbfs` (dB relative to a full-scale square wave). The loudest window, not the overall level, so a mostly
silent reference with a short voiced part is accepted.

Output: ONE table, `OUTPUT_FORMATS` (name -> container, codec, content type, extension, whether a queue job may
store it, whether an HTTP body streams it as it is made). A queue job's result (`encode`: SUPPORTED_OUTPUT_FORMATS)
is 16-bit WAV (default), 16-bit FLAC, OGG/Vorbis or MP3, written in blocks of `_BLOCK_FRAMES` frames: one `sf.write`
of a long signal overflows libvorbis's stack (libsndfile #1095: a segfault beyond ~87 s of OGG). An HTTP response
(OpenAI's response_format, RESPONSE_FORMATS) is one of:

    format  Content-Type            streamed as made  how
    pcm     audio/pcm               yes   16-bit little-endian mono samples at the engine's rate (24 kHz), no
                                          header (what OpenAI's `pcm` is); `pcm_s16le`, the one PCM conversion
                                          (RunPod's streamed audio items use it too)
    wav     audio/wav               yes   a 44-byte header whose two sizes read 0xFFFFFFFF ("unknown", as OpenAI
                                          streams it; libsndfile, FFmpeg and browsers read to the end), then pcm
    opus    audio/ogg; codecs=opus  yes   Ogg Opus by libsndfile, written to an append-only sink: libsndfile writes
                                          an Ogg stream page by page and never goes back, so each page is final
    mp3     audio/mpeg              no    libsndfile (LAME) writes a placeholder first frame and rewrites it at the
                                          end (the Xing/LAME frame count): a copy sent as it is made decodes short
                                          in libsndfile/mpg123 (measured: 0.65 s of 3.3 s)
    flac    audio/flac              no    libsndfile rewrites STREAMINFO (total samples, MD5) at the end; a stream
                                          without it is valid FLAC, but libsndfile itself cannot read it back
    aac     audio/aac               no    AAC in ADTS frames, FFmpeg's encoder through torchcodec (already loaded
                                          with torchaudio)

A streamed format's body goes out piece by piece (`StreamEncoder`); the others are encoded whole (`encode_whole`).
All of it is CPU work: in the event loop use `decode_reference_async` / `encode_async` / `encode_whole_async` (and
StreamEncoder runs Opus in a thread), which run it in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import InvalidAudioError, UnsupportedFormatError

SUPPORTED_INPUT_FORMATS = ("WAV", "FLAC", "OGG", "MP3")


@dataclass(frozen=True)
class OutputFormat:
    """One row of OUTPUT_FORMATS."""

    name: str
    container: str | None  # libsndfile's format; None: written by hand (pcm) or by FFmpeg (aac)
    codec: str | None  # libsndfile's subtype, or what writes it
    content_type: str
    extension: str
    stored: bool  # a queue job may ask for it (output_format): encode() writes it, store_result() names it
    streamed: bool  # an HTTP body in this format is written as the audio is made (StreamEncoder)


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    row.name: row
    for row in (
        OutputFormat("wav", "WAV", "PCM_16", "audio/wav", "wav", stored=True, streamed=True),
        OutputFormat("flac", "FLAC", "PCM_16", "audio/flac", "flac", stored=True, streamed=False),
        OutputFormat("ogg", "OGG", "VORBIS", "audio/ogg", "ogg", stored=True, streamed=False),
        OutputFormat("mp3", "MP3", "MPEG_LAYER_III", "audio/mpeg", "mp3", stored=True, streamed=False),
        OutputFormat("opus", "OGG", "OPUS", "audio/ogg; codecs=opus", "opus", stored=False, streamed=True),
        OutputFormat("aac", None, "aac (FFmpeg, ADTS)", "audio/aac", "aac", stored=False, streamed=False),
        OutputFormat("pcm", None, "pcm_s16le", "audio/pcm", "pcm", stored=False, streamed=True),
    )
}  # fmt: skip
SUPPORTED_OUTPUT_FORMATS: tuple[str, ...] = tuple(name for name, row in OUTPUT_FORMATS.items() if row.stored)
RESPONSE_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's, in OpenAI's order
RESPONSE_TABLE: dict[str, OutputFormat] = {name: OUTPUT_FORMATS[name] for name in RESPONSE_FORMATS}  # a view
CONTENT_TYPES: dict[str, str] = {name: OUTPUT_FORMATS[name].content_type for name in SUPPORTED_OUTPUT_FORMATS}
WAV_UNKNOWN_SIZE = 0xFFFFFFFF
MIN_REF_SECONDS = 1.0
MAX_DECLARED_SECONDS = 600.0
MAX_CHANNELS = 16
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
_MARGIN_SECONDS = 0.25  # decoded beyond max_seconds so the resampler's edge lies in the trimmed tail
_BLOCK_FRAMES = 65536  # frames per libsndfile read or write call
# Largest torchaudio sinc kernel (taps) we let it build: 1M taps is 8 MB per float64 temporary. The largest
# standard-rate kernel into 22,050 Hz is 384 kHz's (147 x 2,772 = 0.4M); into 16 kHz, 22,050 Hz's (320 x 459).
_TORCHAUDIO_MAX_KERNEL = 1 << 20
# Loudness floor of a reference: the loudest 50 ms window's RMS must reach it. Digital silence, dither
# (~-100 dBFS) and typical recording noise floors (-60 dBFS and below) stay under it; the voiced windows of speech
# sit at about -35..-10 dBFS, and even speech recorded 20-25 dB too quietly stays above it.
DEFAULT_MIN_LEVEL_DBFS = -50.0
_LEVEL_WINDOW_S = 0.05


def decode_reference(
    source: str | os.PathLike[str] | bytes,
    target_sr: int,
    max_seconds: float,
    *,
    min_seconds: float = MIN_REF_SECONDS,
    max_declared_seconds: float = MAX_DECLARED_SECONDS,
    min_level_dbfs: float | None = DEFAULT_MIN_LEVEL_DBFS,
) -> np.ndarray:
    """Decode a reference to mono float32 at `target_sr`, trimmed to the first `max_seconds`.

    Raises `InvalidAudioError` for empty, non-audio, corrupt, too short (< `min_seconds`), absurdly long
    (> `max_declared_seconds` declared) or silent (loudest 50 ms window under `min_level_dbfs`; None: no check)
    input."""
    if target_sr < 1 or max_seconds <= 0:
        raise ValueError(f"target_sr must be >= 1 and max_seconds > 0, got {target_sr}, {max_seconds}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidAudioError("reference audio is empty (0 bytes)")
        handle = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise InvalidAudioError("reference audio is empty (0 bytes)")
        except FileNotFoundError:
            raise InvalidAudioError("reference audio file is missing") from None
        handle = path
    try:
        with sf.SoundFile(handle) as audio:
            rate, channels, frames, fmt = audio.samplerate, audio.channels, audio.frames, audio.format
            _check_header(rate, channels, frames, fmt, max_declared_seconds)
            wanted = min(frames, math.ceil((max_seconds + _MARGIN_SECONDS) * rate))
            mono = _read_mono(audio, wanted)
    except sf.LibsndfileError as exc:
        raise InvalidAudioError(_libsndfile_reason(exc)) from None
    except (RuntimeError, ValueError, TypeError) as exc:  # soundfile's other failures on odd input
        raise InvalidAudioError(f"reference audio could not be decoded ({type(exc).__name__})") from None
    if mono.size == 0:
        raise InvalidAudioError("reference audio has no samples")
    if not np.isfinite(mono).all():
        raise InvalidAudioError("reference audio contains NaN or infinite samples")
    duration = mono.size / rate
    if duration < min_seconds:
        raise InvalidAudioError(f"reference audio is {duration:.2f} s long; at least {min_seconds:g} s is needed")
    wav = _resample(mono, rate, target_sr)
    np.clip(wav, -1.0, 1.0, out=wav)
    wav = np.ascontiguousarray(wav[: int(target_sr * max_seconds)], dtype=np.float32)
    if min_level_dbfs is not None:
        check_level(wav, target_sr, min_level_dbfs)
    return wav


def reference_level(wav: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """(peak, RMS of the loudest `_LEVEL_WINDOW_S` window) of mono audio, in dBFS (-inf for zero). Windows overlap
    by half; each window's mean is removed first, so a constant offset reads as silence."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return -math.inf, -math.inf
    peak = float(np.abs(x).max())
    width = max(1, min(x.size, round(_LEVEL_WINDOW_S * sample_rate)))
    windows = np.lib.stride_tricks.sliding_window_view(x, width)[:: max(1, width // 2)]
    if (x.size - width) % max(1, width // 2):  # the tail, so the last samples are measured too
        windows = np.concatenate([windows, x[-width:][None, :]])
    loudest = float(np.sqrt(max(0.0, windows.var(axis=1).max())))
    return _dbfs(peak), _dbfs(loudest)


def check_level(wav: np.ndarray, sample_rate: int, min_level_dbfs: float) -> None:
    """`InvalidAudioError` unless the loudest window of `wav` reaches `min_level_dbfs` (see `reference_level`)."""
    peak, loudest = reference_level(wav, sample_rate)
    if not loudest >= min_level_dbfs:
        raise InvalidAudioError(
            f"reference audio is silent or nearly so: peak {_fmt_db(peak)} dBFS, RMS of the loudest "
            f"{_LEVEL_WINDOW_S * 1000:.0f} ms window {_fmt_db(loudest)} dBFS; at least {min_level_dbfs:g} dBFS "
            "is needed (send a recording of the voice, not of silence)")


def encode(wav: np.ndarray, sample_rate: int, fmt: str = "wav") -> tuple[bytes, str]:
    """Encode mono float audio in [-1, 1] (clipped) as `fmt`; returns (bytes, content type)."""
    fmt = normalize_format(fmt)
    samples = np.asarray(wav, dtype=np.float32)
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim != 1:
        raise ValueError(f"encode expects mono audio (1-D), got shape {samples.shape}")
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
    samples = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    row = OUTPUT_FORMATS[fmt]
    container, subtype = row.container, row.codec
    buffer = io.BytesIO()
    # Block by block: one write of a long signal overflows libvorbis's stack (libsndfile #1095).
    with sf.SoundFile(buffer, "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype) as out:
        for start in range(0, samples.size, _BLOCK_FRAMES):
            out.write(samples[start: start + _BLOCK_FRAMES])
    return buffer.getvalue(), row.content_type


def normalize_format(fmt: str) -> str:
    """`fmt` lower-cased if supported (`wav`, `flac`, `ogg`, `mp3`), else `UnsupportedFormatError`."""
    value = fmt.lower().strip() if isinstance(fmt, str) else fmt
    if value not in SUPPORTED_OUTPUT_FORMATS:
        raise UnsupportedFormatError(
            f"unsupported output format {fmt!r}; use one of {', '.join(SUPPORTED_OUTPUT_FORMATS)}")
    return value


async def decode_reference_async(source: str | os.PathLike[str] | bytes, target_sr: int, max_seconds: float,
                                 **kwargs: float | None) -> np.ndarray:
    return await asyncio.to_thread(decode_reference, source, target_sr, max_seconds, **kwargs)


async def encode_async(wav: np.ndarray, sample_rate: int, fmt: str = "wav") -> tuple[bytes, str]:
    return await asyncio.to_thread(encode, wav, sample_rate, fmt)


# ---------------------------------------------------------------------- HTTP bodies (RESPONSE_FORMATS)


def pcm_s16le(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (clipped) as 16-bit little-endian PCM: the one conversion (RunPod's streamed
    items, the pcm and wav bodies)."""
    return np.clip(np.rint(np.asarray(samples, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono PCM WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", WAV_UNKNOWN_SIZE) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", WAV_UNKNOWN_SIZE))  # fmt: skip


class StreamEncoder:
    """The body of a streamed format, piece by piece: `await feed(samples)`, then `await finish()`; each returns
    the bytes to send now (possibly none)."""

    def __init__(self, fmt: str, sample_rate: int):
        if not OUTPUT_FORMATS[fmt].streamed:
            raise ValueError(f"{fmt} is not a streamed format")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._started = False
        self._opus: _OpusWriter | None = _OpusWriter(sample_rate) if fmt == "opus" else None

    async def feed(self, samples: np.ndarray) -> bytes:
        if self._opus is not None:
            return await asyncio.to_thread(self._opus.write, samples)
        head = b""
        if not self._started and self.fmt == "wav":
            head = wav_stream_header(self.sample_rate)
        self._started = True
        return head + pcm_s16le(samples)

    async def finish(self) -> bytes:
        if self._opus is not None:
            return await asyncio.to_thread(self._opus.close)
        return await self.feed(np.zeros(0, dtype=np.float32))  # a WAV header, if no audio came at all


class _AppendOnlySink(io.RawIOBase):
    """A file for libsndfile that keeps only what was written since the last `take()`. It refuses to move back
    (a writer that rewrites its header could not be streamed): an Ogg writer never does."""

    def __init__(self):
        super().__init__()
        self._pending = bytearray()
        self._position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._pending += bytes(data)
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset  # the end is the position
        if target != self._position:
            raise OSError(f"a streamed encoder may only append (asked to move from {self._position} to {target})")
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data, self._pending = bytes(self._pending), bytearray()
        return data


class _OpusWriter:
    """Ogg Opus through libsndfile into an append-only sink (one per response; one thread at a time)."""

    def __init__(self, sample_rate: int):
        self._sink = _AppendOnlySink()
        self._file = sf.SoundFile(self._sink, "w", samplerate=sample_rate, channels=1, format="OGG", subtype="OPUS")

    def write(self, samples: np.ndarray) -> bytes:
        self._file.write(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0))
        return self._sink.take()

    def close(self) -> bytes:
        self._file.close()
        return self._sink.take()


def encode_whole(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole audio in `fmt` (any of RESPONSE_FORMATS): an HTTP body that is not streamed."""
    if fmt in ("mp3", "flac", "wav"):
        return encode(wav, sample_rate, fmt)[0]
    if fmt == "pcm":
        return pcm_s16le(wav)
    if fmt == "opus":
        writer = _OpusWriter(sample_rate)
        return writer.write(wav) + writer.close()
    if fmt == "aac":
        return _aac(wav, sample_rate)
    raise ValueError(f"unknown response format {fmt!r}")


async def encode_whole_async(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    return await asyncio.to_thread(encode_whole, wav, sample_rate, fmt)


def _aac(wav: np.ndarray, sample_rate: int) -> bytes:
    import torch
    from torchcodec.encoders import AudioEncoder

    samples = torch.from_numpy(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)).reshape(1, -1)
    return AudioEncoder(samples, sample_rate=sample_rate).to_tensor(format="adts").numpy().tobytes()


# ---------------------------------------------------------------------- decoding, inside


def _check_header(rate: int, channels: int, frames: int, fmt: str, max_declared_seconds: float) -> None:
    if fmt not in SUPPORTED_INPUT_FORMATS:
        raise InvalidAudioError(
            f"reference audio format {fmt} is not supported; use {', '.join(SUPPORTED_INPUT_FORMATS)}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(f"reference audio declares an implausible sample rate of {rate} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidAudioError(f"reference audio declares an implausible {channels} channels")
    if frames <= 0:
        raise InvalidAudioError("reference audio has no samples")
    if frames / rate > max_declared_seconds:
        raise InvalidAudioError(
            f"reference audio declares {frames / rate:.0f} s; at most {max_declared_seconds:g} s is accepted")


def _read_mono(audio: sf.SoundFile, frames: int) -> np.ndarray:
    """Read up to `frames` frames block by block, mixing each block to mono (memory: one mono buffer)."""
    out = np.empty(frames, dtype=np.float32)
    filled = 0
    while filled < frames:
        block = audio.read(min(_BLOCK_FRAMES, frames - filled), dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        out[filled: filled + block.shape[0]] = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
        filled += block.shape[0]
    return out[:filled]


def _torchaudio_kernel_taps(orig_sr: int, target_sr: int) -> int:
    """Taps of the kernel `torchaudio.functional.resample` builds (defaults: lowpass_filter_width 6, rolloff
    0.99): `new * (orig + 2 * width)`, the rates reduced by their gcd."""
    gcd = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // gcd, target_sr // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return new * (orig + 2 * width)


def _resample(mono: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return mono.copy()
    if _torchaudio_kernel_taps(orig_sr, target_sr) > _TORCHAUDIO_MAX_KERNEL:
        import soxr

        return np.asarray(soxr.resample(mono, orig_sr, target_sr, quality="VHQ"), dtype=np.float32)
    import torch
    import torchaudio.functional as F

    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(mono)).unsqueeze(0)
        return F.resample(tensor, orig_sr, target_sr).squeeze(0).numpy().copy()


_UNHELPFUL = ("not recognised", "does not exist", "unspecified internal error", "not a regular file")


def _dbfs(amplitude: float) -> float:
    # Under -200 dBFS is rounding error (a window's mean removed from a constant), not signal: read as silence.
    return 20.0 * math.log10(amplitude) if amplitude > 1e-10 else -math.inf


def _fmt_db(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "-inf"


def _libsndfile_reason(exc: sf.LibsndfileError) -> str:
    detail = (getattr(exc, "error_string", "") or "").strip().rstrip(".")
    base = "reference audio is not a valid WAV, FLAC, OGG/Vorbis or MP3 file"
    if not detail or any(text in detail.lower() for text in _UNHELPFUL):
        return base
    return f"{base} ({detail})"
