"""STREAMING=on (RunPod's /stream): a streamed job's audio as stream items, and the size of what the SDK sends again.

    {"type": "audio", "index", "audio" (base64 of 16-bit little-endian mono PCM: storage.audio.pcm_s16le),
     "encoding": "pcm_s16le", "sample_rate", "start", "duration"}

each <= MAX_ITEM_S of audio (RunPod takes <= 1 MB per yield).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from storage.audio import pcm_s16le

if TYPE_CHECKING:
    from batching.streaming import AudioChunk
    from server.jobs import Job

# STREAM_AGGREGATE=on: the job-done POST carries every streamed item again. Its size against the audio's length,
# measured through the real SDK loop (tests/reliability/test_streaming_in_the_loop.py): base64 of 16-bit PCM at
# 24 kHz is 64,000 bytes a second, plus each item's JSON keys.
AGGREGATE_BYTES_PER_S = 64_200
RUNPOD_RUN_CAP_BYTES = 10 * 10**6  # RunPod's documented payload cap of /run (/runsync: 20 MB)

# Audio items: 16-bit PCM, at most this much audio each, so that every stream POST stays well under RunPod's
# 1 MB per yield (10 s at 24 kHz: 480 KB of PCM, 640 KB of base64).
MAX_ITEM_S = 10.0


def audio_items(chunk: AudioChunk, first_index: int) -> list[dict]:
    """A chunk of a streamed job's audio as stream items (split when longer than MAX_ITEM_S)."""
    sr = chunk.sample_rate
    step = int(MAX_ITEM_S * sr)
    items = []
    for n, lo in enumerate(range(0, len(chunk.samples), step)):
        part = chunk.samples[lo : lo + step]
        items.append({
            "type": "audio",
            "index": first_index + n,
            "audio": base64.b64encode(pcm_s16le(part)).decode("ascii"),
            "encoding": "pcm_s16le",
            "sample_rate": sr,
            "start": round((chunk.start + lo) / sr, 6),
            "duration": round(len(part) / sr, 6),
        })  # fmt: skip
    return items


def warn_of_aggregate(job: Job, stream_aggregate: bool) -> None:
    """STREAM_AGGREGATE=on: the SDK's job-done POST carries every item again (AGGREGATE_BYTES_PER_S): say so
    before a job whose audio, estimated from its text, would take it past RunPod's 10 MB /run cap."""
    if not stream_aggregate:
        return
    from batching.scheduler import SPOKEN_CHARS_PER_S  # loaded already: the scheduler runs the job

    request = job.request
    audio_s = len(request.gen_text) / SPOKEN_CHARS_PER_S / request.speed
    estimate = audio_s * AGGREGATE_BYTES_PER_S
    if estimate > RUNPOD_RUN_CAP_BYTES:
        job.log.warning(
            "[%s] about %.0f s of audio: its job-done POST will carry about %.1f MB of streamed items, over "
            "RunPod's %d MB cap for /run (20 MB for /runsync); callers that read /stream only should run this "
            "worker with STREAM_AGGREGATE=off", job.id, audio_s, estimate / 1e6, RUNPOD_RUN_CAP_BYTES // 10**6,
        )  # fmt: skip
