"""`python -m server` whose engine returns long audio at once, for tests/reliability/test_audio_long_results_in_the_loop.py.

Run as a script with the worker's environment. The vocoder (`XttsEngine.vocode`, which both the continuous
scheduler and `generate` go through) returns LONG_AUDIO_S seconds (default 300) of a 220 Hz tone at the engine's
output rate for every row, without running HiFi-GAN, so a test reaches the encoders with the longest results the
worker can produce (MAX_TEXT_CHARS=5000 is about 5 minutes of speech) in seconds. Everything else is the real
worker: the RunPod SDK's production loop, the handler, the scheduler, the GPT decoding, the encoders, the upload.

Each call prints `long_audio_worker: vocode rows=N seconds=S`, so a test can tell its jobs reached the engine.
"""

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batching.engine import XttsEngine  # noqa: E402

TONE_HZ = 220.0


def long_tone(seconds: float, sample_rate: int) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    return (0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def vocode(self, rows):
    seconds = float(os.environ.get("LONG_AUDIO_S", "300"))
    print(f"long_audio_worker: vocode rows={len(rows)} seconds={seconds:g}", flush=True)
    wav = long_tone(seconds, self.sample_rate)
    return [wav.copy() for _ in rows]


_real_vocode = XttsEngine.vocode

if __name__ == "__main__":
    # The faults are injected into whole-row vocoding (`vocode`): finished rows are not cut into spans here.
    os.environ.setdefault("VOCODER_SPAN_S", "0")
    # Only in the worker process: importing this module changes nothing.
    XttsEngine.vocode = vocode
    from server.__main__ import main

    sys.exit(main())
