"""The CUDA-graph path's control flow (batching/graphs.py) on a CPU, with stand-in capture backends: one capture per
(slots, columns) bucket, replays after CHECKED_REPLAYS checks, the check against the eager step, the fallback
(XTTS_CUDA_GRAPHS=auto: a warning, then eager steps and the eager step's audio), the error (on), a failed
capture, recapture after the buffers grow. The real capture (torch.cuda.graph) needs a GPU: it has never run."""

import logging

import numpy as np
import pytest
import torch

from batching.engine import SamplingParams, Segment, XttsEngine
from batching.graphs import CHECKED_REPLAYS, GraphCheckError, GraphStep, graphs_wanted
from batching.static_batch import FIRST_SLOTS, StaticBatch
from testing.voices import synthetic_voice


class StandIn:
    """Captures by keeping the step function; a replay runs it. `corrupt` adds to the replayed logits (a graph
    that computes something else); `fail` makes capture raise."""

    def __init__(self, corrupt: float = 0.0, fail: bool = False):
        self.corrupt, self.fail = corrupt, fail
        self.captured: list = []

    def capture(self, fn, restore):
        if self.fail:
            raise RuntimeError("capture refused by the stand-in")
        fn()  # the warm-up runs, as on CUDA, and the state is put back
        restore()
        self.captured.append(fn)

        def replay():
            h, logits, tok = fn()
            return h, logits + self.corrupt, tok

        return replay


@pytest.fixture(scope="module")
def rows(tiny_engine):
    voice = tiny_engine.condition(synthetic_voice(3.0, f0=150, seed=3), 22050)
    texts = ["Graphs replay the same step.", "Uma frase curta.", "Noch ein Satz, etwas länger als der andere."]
    return [Segment(tiny_engine.tokenize(t, "en"), len(t), voice, SamplingParams(seed=20 + i, temperature=0.8))
            for i, t in enumerate(texts)]  # fmt: skip


def run(engine, rows, run_step=None, late: int = 4):
    """Rows 0 and 1 at step 0, row 2 at step `late`; returns ({key: codes}, the StaticBatch)."""
    batch = StaticBatch(engine, keep_buffers=True)
    if isinstance(run_step, type):
        run_step = run_step(batch)
    elif callable(run_step):
        run_step = run_step(batch)
    codes, step = {}, 0
    with torch.inference_mode():
        batch.admit([0, 1], rows[:2])
        while len(batch) or step <= late:
            if step == late:
                batch.admit([2], rows[2:])
            for row in batch.step(run_step).finished:
                codes[row.key] = row.codes
            step += 1
    return codes, batch


def test_replayed_steps_give_the_eager_codes_one_capture_per_bucket(tiny_engine, rows):
    eager, _ = run(tiny_engine, rows)
    backend = StandIn()
    made = []

    def graphs(batch):
        made.append(GraphStep(batch, backend=backend))
        return made[0]

    replayed, batch = run(tiny_engine, rows, graphs)
    (g,) = made
    for key in eager:
        np.testing.assert_array_equal(replayed[key], eager[key], err_msg=f"row {key}")
    buckets = set(g.graphs)  # those of the current buffers (row 2's admission reallocated them: recaptured)
    assert len(backend.captured) == g.captures >= len(buckets) + 1 and (4, 128) in buckets
    assert all(n in (1, 2, 4) and width % 64 == 0 and width & (width - 1) == 0 for n, width in buckets)
    # Every graph is checked before it is trusted (one dropped by the reallocation may not have finished its).
    assert CHECKED_REPLAYS * len(buckets) <= g.checks <= CHECKED_REPLAYS * g.captures
    assert all(left == 0 for left in g.checks_left.values()) and g.replays > g.checks and g.enabled
    assert g.worst_difference == 0.0  # the stand-in runs the eager arithmetic itself


def test_a_graph_that_differs_is_caught_and_the_worker_goes_on_eagerly(tiny_engine, rows, caplog):
    eager, _ = run(tiny_engine, rows)
    made = []

    def graphs(batch):
        made.append(GraphStep(batch, backend=StandIn(corrupt=1.0)))
        return made[0]

    with caplog.at_level(logging.WARNING, logger="batching.graphs"):
        fallen, _ = run(tiny_engine, rows, graphs)
    (g,) = made
    assert not g.enabled and g.checks == 1 and g.replays == 0 and not g.graphs
    assert "CUDA graphs off" in caplog.text and "differs from the eager step" in caplog.text
    for key in eager:  # never the graph's audio
        np.testing.assert_array_equal(fallen[key], eager[key], err_msg=f"row {key}")


def test_on_makes_a_differing_graph_an_error(tiny_engine, rows):
    with pytest.raises(GraphCheckError, match="XTTS_CUDA_GRAPHS=on"):
        run(tiny_engine, rows, lambda batch: GraphStep(batch, strict=True, backend=StandIn(corrupt=1.0)))


def test_a_failed_capture_falls_back_to_eager(tiny_engine, rows, caplog):
    eager, _ = run(tiny_engine, rows)
    made = []

    def graphs(batch):
        made.append(GraphStep(batch, backend=StandIn(fail=True)))
        return made[0]

    with caplog.at_level(logging.WARNING, logger="batching.graphs"):
        fallen, _ = run(tiny_engine, rows, graphs)
    assert not made[0].enabled and "capture refused by the stand-in" in caplog.text
    for key in eager:
        np.testing.assert_array_equal(fallen[key], eager[key])


def test_graphs_are_recaptured_when_the_buffers_grow(tiny_engine, rows):
    backend = StandIn()
    batch = StaticBatch(tiny_engine, keep_buffers=True)
    g = GraphStep(batch, backend=backend)
    with torch.inference_mode():
        batch.admit([0], rows[:1])
        batch.step(g)
        first = batch.generation
        assert len(g.graphs) == 1
        many = [f"r{i}" for i in range(FIRST_SLOTS)]
        batch.admit(many, [rows[1]] * len(many))  # past the first slots: the buffers are reallocated
        assert batch.generation > first
        batch.step(g)
    assert len(g.graphs) == 1 and g.captures == 2  # the old graph dropped, the new bucket captured


def test_the_setting_is_checked_and_means_off_on_a_cpu(tiny_checkpoint):
    cpu = torch.device("cpu")
    assert graphs_wanted("auto", cpu) is False and graphs_wanted("off", cpu) is False
    assert graphs_wanted("auto", torch.device("cuda")) is True and graphs_wanted("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="XTTS_CUDA_GRAPHS=on needs a CUDA device"):
        graphs_wanted("on", cpu)
    with pytest.raises(ValueError, match="XTTS_CUDA_GRAPHS must be one of auto, on, off, got 'yes'"):
        graphs_wanted("yes", cpu)
    with pytest.raises(ValueError, match="XTTS_KV_CACHE must be one of auto, static, dynamic, got 'paged'"):
        XttsEngine.load(tiny_checkpoint, device="cpu", kv_cache="paged")
    engine = XttsEngine.load(tiny_checkpoint, device="cpu", kv_cache="static", cuda_graphs="auto")
    assert engine.kv_cache == "static" and engine.graphs is None
    assert XttsEngine.load(tiny_checkpoint, device="cpu").kv_cache == "dynamic"  # auto on a CPU
