"""Synthesize one file from the command line, straight through the engine (no queue, no storage).

    python -m batching --model-dir DIR --ref voice.wav --text "Olá!" --language pt -o out.wav

A quick way to check a checkpoint, a device and a reference voice before starting the worker.
"""

from __future__ import annotations

import argparse
import sys
import time

from batching.params import SAMPLING_DEFAULTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint folder (default: the released XTTS-v2, needs the weights)")
    parser.add_argument("--ref", required=True, help="reference voice audio file (WAV, FLAC, OGG or MP3)")
    parser.add_argument("--text", required=True)
    parser.add_argument("--language", default="pt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS.temperature)
    parser.add_argument("--speed", type=float, default=SAMPLING_DEFAULTS.speed)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-o", "--output", default="output.wav")
    ns = parser.parse_args(argv)

    import soundfile as sf

    from batching.engine import SamplingParams, XttsEngine
    from batching.errors import EngineError

    try:
        engine = XttsEngine.load(ns.model_dir, device=ns.device)
        ref, ref_sr = sf.read(ns.ref, dtype="float32", always_2d=True)
        voice = engine.condition(ref.mean(axis=1), ref_sr)
        started = time.perf_counter()
        params = SamplingParams(temperature=ns.temperature, speed=ns.speed, seed=ns.seed)
        result = engine.synthesize(ns.text, ns.language, voice, params)
    except EngineError as exc:
        print(f"error ({exc.error_code}): {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    sf.write(ns.output, result.wav, result.sample_rate)
    print(f"wrote {ns.output}: {result.duration_s:.2f} s of audio in {elapsed:.2f} s "
          f"({len(result.segments)} segment(s), RTF {elapsed / max(result.duration_s, 1e-9):.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
