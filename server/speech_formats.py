"""The audio of an HTTP response (SERVER_MODE=http), in the format the caller asked for: OpenAI's response_format.

    format  Content-Type            streamed as made  how
    pcm     audio/pcm               yes   16-bit little-endian mono samples at the engine's rate (24 kHz), no
                                          header (what OpenAI's `pcm` is)
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

A streamed format's body goes out chunk by chunk as the scheduler vocodes the audio (batching.Scheduler.stream);
the others are encoded once the whole audio is made, and sent with a Content-Length. Encoding is CPU work: the
Opus and whole-file encoders run in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from storage.audio import encode

RESPONSE_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
WAV_UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class ResponseFormat:
    name: str
    content_type: str
    streamed: bool  # True: the body is written as the audio is made


FORMATS: dict[str, ResponseFormat] = {
    "pcm": ResponseFormat("pcm", "audio/pcm", True),
    "wav": ResponseFormat("wav", "audio/wav", True),
    "opus": ResponseFormat("opus", "audio/ogg; codecs=opus", True),
    "mp3": ResponseFormat("mp3", "audio/mpeg", False),
    "flac": ResponseFormat("flac", "audio/flac", False),
    "aac": ResponseFormat("aac", "audio/aac", False),
}
assert tuple(sorted(FORMATS)) == tuple(sorted(RESPONSE_FORMATS))


def pcm_s16le(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (clipped) as 16-bit little-endian PCM (the rounding of server.handler's items)."""
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
        if not FORMATS[fmt].streamed:
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
    """The whole audio in `fmt` (any of RESPONSE_FORMATS)."""
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
