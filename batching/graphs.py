"""CUDA graphs of the static decoding step (batching/static_batch.py): one graph per (slots, columns) bucket,
captured the first time the bucket is met, then replayed: one launch for the whole step (30 GPT-2 blocks,
the sampler) instead of hundreds of small kernels launched from Python.

XTTS_CUDA_GRAPHS:
    off    the eager step, always;
    auto   (the default) on CUDA, graphs after a self-check: the first CHECKED_REPLAYS replays of every graph are
           compared with the eager step on the same inputs (state restored between the two). A difference in
           the logits or hidden states beyond the dtype's tolerance, or a failed capture, logs a warning and
           turns graphs off for good: the worker goes on, eagerly, and never gives audio from a wrong graph. On
           a CPU, auto means off;
    on     as auto, but a failed capture or check is an error (the operator asked for graphs).

A graph reads and writes only the StaticBatch's buffers, so it is valid while they are: when they are
reallocated (more slots or columns; `StaticBatch.generation` changes), the graphs are dropped and recaptured.

The capture itself is behind a small backend (`CudaGraphBackend`): the tests drive the control flow (capture per
bucket, replay, the check, the fallback) on a CPU with a stand-in backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("auto", "on", "off")
CHECKED_REPLAYS = 3  # replays of each graph compared with the eager step before it is trusted
# Largest allowed |graph - eager| over max(1, |eager|), by the GPT's compute dtype (fp16: ~3 decimal digits).
TOLERANCES = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}
_MUTATED = ("pos", "length", "next_tok", "seen")  # what a step changes besides per-position writes


class GraphCheckError(RuntimeError):
    """A captured graph disagreed with the eager step (XTTS_CUDA_GRAPHS=on makes this an error)."""


class CudaGraphBackend:
    """torch.cuda.graph capture with a warm-up on a side stream and one memory pool for every graph."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], tuple], restore: Callable[[], None]) -> Callable[[], tuple]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up (cuBLAS workspaces, lazy kernels); it runs, so the state is put back after it
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()  # recorded, not run

        def replay() -> tuple:
            graph.replay()
            return out

        return replay


def graphs_wanted(mode: str, device: torch.device) -> bool:
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"XTTS_CUDA_GRAPHS must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"XTTS_CUDA_GRAPHS=on needs a CUDA device, the engine runs on {device}")
    return mode != "off" and device.type == "cuda"


class GraphStep:
    """The `run(n, width)` that StaticBatch.step calls: a bucket's graph replayed, or the eager step."""

    def __init__(self, batch, *, strict: bool = False, backend=None, dtype: torch.dtype | None = None):
        self.batch = batch
        self.strict = strict  # XTTS_CUDA_GRAPHS=on
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.tolerance = TOLERANCES.get(dtype or torch.float32, 1e-4)
        self.enabled = True
        self.graphs: dict[tuple[int, int], Callable[[], tuple]] = {}
        self.checks_left: dict[tuple[int, int], int] = {}
        self._generation = None
        self.captures = self.replays = self.checks = 0
        self.worst_difference = 0.0  # largest relative difference a check saw

    def __call__(self, n: int, width: int) -> torch.Tensor:
        if not self.enabled:
            return self.batch.eager(n, width)
        if self.batch.generation != self._generation:  # buffers reallocated: every graph points at old ones
            self.graphs.clear()
            self.checks_left.clear()
            self._generation = self.batch.generation
        key = (n, width)
        try:
            if key not in self.graphs:
                self.graphs[key] = self._capture(n, width)
                self.checks_left[key] = CHECKED_REPLAYS
                self.captures += 1
            if self.checks_left[key] > 0:
                self.checks_left[key] -= 1
                return self._checked(key, n, width)
        except GraphCheckError:
            raise
        except Exception as exc:  # noqa: BLE001 - a capture that fails must not fail the rows
            self._give_up(f"capturing the decoding step for {n} slots x {width} columns failed: "
                          f"{type(exc).__name__}: {exc}")  # fmt: skip
            return self.batch.eager(n, width)
        self.replays += 1
        return self.graphs[key]()[2]

    def _step_fn(self, n: int, width: int) -> Callable[[], tuple]:
        def step() -> tuple:
            h, logits = self.batch.forward(n, width)
            return h, logits, self.batch.sample(n, h, logits)

        return step

    def _capture(self, n: int, width: int) -> Callable[[], tuple]:
        saved = self._save(n)
        return self.backend.capture(self._step_fn(n, width), lambda: self._restore(saved))

    def _checked(self, key, n: int, width: int) -> torch.Tensor:
        saved = self._save(n)
        h_e, logits_e = self.batch.forward(n, width)
        h_e, logits_e = h_e.clone(), logits_e.clone()
        tok_e = self.batch.sample(n, h_e, logits_e).clone()
        self._restore(saved)
        h_g, logits_g, tok_g = self.graphs[key]()
        self.checks += 1
        used = torch.tensor([k is not None for k in self.batch.slot_keys[:n]], device=logits_e.device)
        diff = max(_relative(logits_g[used], logits_e[used]), _relative(h_g[used], h_e[used]))
        self.worst_difference = max(self.worst_difference, diff)
        if diff <= self.tolerance:
            self.replays += 1
            return tok_g
        self._give_up(f"the captured decoding step for {n} slots x {width} columns differs from the eager step "
                      f"by {diff:.3g} (relative; the tolerance is {self.tolerance:g})")  # fmt: skip
        self._restore(saved)  # the graph wrote its keys, values, codes and hidden states: the eager step again
        tok = self.batch.eager(n, width)
        if not torch.equal(tok, tok_e):
            raise GraphCheckError("the eager decoding step is not deterministic on this device")
        return tok

    def _give_up(self, why: str) -> None:
        if self.strict:
            raise GraphCheckError(why + " (XTTS_CUDA_GRAPHS=on)")
        log.warning("CUDA graphs off, the eager decoding step from now on: %s", why)
        self.enabled = False
        self.graphs.clear()

    def _save(self, n: int) -> dict[str, torch.Tensor]:
        return {name: self.batch.t[name][:n].clone() for name in _MUTATED}

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            self.batch.t[name][: value.shape[0]].copy_(value)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.numel():
        return 0.0
    diff = (a.float() - b.float()).abs().max()
    return float(diff / b.float().abs().max().clamp(min=1.0))
