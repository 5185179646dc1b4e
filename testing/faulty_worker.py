"""`python -m server` with faults injected into the real engine, for the tests in the loop (tests/reliability, tests/e2e).

Run as a script with the worker's environment. A row whose sampling seed (the job's `seed`) is one of the values
below misbehaves inside the engine's step-level calls (`XttsEngine.admit`, `step`, `vocode`, which both the
continuous scheduler and `generate` go through); every other part is the real worker: the RunPod SDK's
production loop, the handler, the scheduler and the engine on a demo checkpoint.

    RAISE  any decoding step holding the row raises (a bug or a bad kernel)
    NAN    the row's audio comes back as NaN
    OOM    any decoding step of more than one row holding it raises torch's out-of-memory error
    CUDA   any decoding step holding it raises a CUDA error (the device is unusable)
    SLOW   admitting it holds the engine thread for FAULTY_SLOW_S seconds first (default 8)
    GATE   an ordinary row, held at the gate (below) by default

The gate: while the file named by FAULTY_GATE_FILE exists, an admission holding one of the seeds in
FAULTY_GATE_SEEDS (comma-separated; default GATE) waits before anything else, so that a test can fill the queue
behind it and then open the gate (delete the file) on cue, instead of hoping the engine stays busy long enough.

Every admission prints the seeds of its rows (`faulty_worker: generate seeds=[...]`), so a test can tell which
jobs reached the engine; a held admission prints `faulty_worker: held at the gate` and `faulty_worker: gate
opened`. The process prints `faulty_worker: fatal error at <unix time>` when the scheduler reports a fatal engine
error (server.__main__._exit_on_fatal) and `faulty_worker: exiting at <unix time>` when the exit fires
(server.__main__._hard_exit), so a test can measure the grace between them.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batching.engine import XttsEngine  # noqa: E402

RAISE, NAN, OOM, CUDA, SLOW, GATE = 9001, 9002, 9003, 9004, 9005, 9006


def _wait_at_the_gate(seeds: set) -> None:
    gate = os.environ.get("FAULTY_GATE_FILE")
    held = {int(s) for s in os.environ.get("FAULTY_GATE_SEEDS", str(GATE)).split(",") if s.strip()}
    if gate and seeds & held and os.path.exists(gate):
        print("faulty_worker: held at the gate", flush=True)
        while os.path.exists(gate):
            time.sleep(0.02)
        print("faulty_worker: gate opened", flush=True)


def _seeds(segments) -> set:
    return {s.params.seed for s in segments}


def admit(self, keys, segments):
    seeds = _seeds(segments)
    print(f"faulty_worker: generate seeds={sorted(seeds, key=lambda x: -1 if x is None else x)}", flush=True)
    _wait_at_the_gate(seeds)
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
    # The faults are injected into whole-row vocoding (`vocode`): finished rows are not cut into spans here.
    os.environ.setdefault("VOCODER_SPAN_S", "0")
    # Only in the worker process: importing this module (the tests take the seed values from it) changes nothing.
    for name, fn in PATCHES.items():
        setattr(XttsEngine, name, fn)
    import server.__main__ as entry

    _real_exit_on_fatal, _real_hard_exit = entry._exit_on_fatal, entry._hard_exit

    def _exit_on_fatal(error):
        print(f"faulty_worker: fatal error at {time.time():.3f}", flush=True)
        _real_exit_on_fatal(error)

    def _hard_exit():
        print(f"faulty_worker: exiting at {time.time():.3f}", flush=True)
        _real_hard_exit()

    # Module globals, looked up when the scheduler is built (on_fatal) and when the exit timer is armed.
    entry._exit_on_fatal, entry._hard_exit = _exit_on_fatal, _hard_exit
    sys.exit(entry.main())
