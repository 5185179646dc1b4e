"""`python -m server` with faults injected into the real engine, for test_engine_faults_in_the_loop.py.

Run as a script with the worker's environment. A row whose sampling seed (the job's `seed`) is one of the values
below misbehaves inside the engine's step-level calls (`XttsEngine.admit`, `step`, `vocode`, which both the
continuous scheduler and `generate` go through); every other part is the real worker: the RunPod SDK's
production loop, the handler, the scheduler and the engine on a demo checkpoint.

    RAISE  any decoding step holding the row raises (a bug or a bad kernel)
    NAN    the row's audio comes back as NaN
    OOM    any decoding step of more than one row holding it raises torch's out-of-memory error
    CUDA   any decoding step holding it raises a CUDA error (the device is unusable)
    SLOW   admitting it holds the engine thread for FAULTY_SLOW_S seconds first (default 8)

Every admission prints the seeds of its rows (`faulty_worker: generate seeds=[...]`), so a test can tell which
jobs reached the engine.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from batching.engine import XttsEngine  # noqa: E402

RAISE, NAN, OOM, CUDA, SLOW = 9001, 9002, 9003, 9004, 9005


def _seeds(segments) -> set:
    return {s.params.seed for s in segments}


def admit(self, keys, segments):
    seeds = _seeds(segments)
    print(f"faulty_worker: generate seeds={sorted(seeds, key=lambda x: -1 if x is None else x)}", flush=True)
    if SLOW in seeds:
        time.sleep(float(os.environ.get("FAULTY_SLOW_S", "8")))
        print("faulty_worker: slow call done", flush=True)
    return _real_admit(self, keys, segments)


def step(self):
    running = self._running.segments
    seeds = _seeds(running)
    if CUDA in seeds:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    if RAISE in seeds:
        raise ValueError("injected failure")
    if OOM in seeds and len(running) > 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    return _real_step(self)


def vocode(self, rows):
    wavs = _real_vocode(self, rows)
    return [np.full_like(w, np.nan) if r.segment.params.seed == NAN else w for r, w in zip(rows, wavs, strict=True)]


PATCHES = {"admit": admit, "step": step, "vocode": vocode}
_real_admit, _real_step, _real_vocode = XttsEngine.admit, XttsEngine.step, XttsEngine.vocode

if __name__ == "__main__":
    # Only in the worker process: importing this module (the tests take the seed values from it) changes nothing.
    for name, fn in PATCHES.items():
        setattr(XttsEngine, name, fn)
    from server.__main__ import main

    sys.exit(main())
