"""Fixtures of the scheduler tests: a hand-moved clock, and `make_scheduler`, which builds started schedulers around
a fake engine and closes every one it made. Each test module names its fake engine class in a `fake_engine`
fixture (tests/batching/test_scheduler.py: whole batches; test_continuous_scheduler.py: step by step)."""

import pytest

from batching.latents import LatentCache
from batching.scheduler import Scheduler
from testing.fake_engine import Clock


@pytest.fixture
async def make_scheduler(fake_engine):
    """`await make_scheduler(engine=None, **settings)` -> (a started Scheduler, its engine): a fresh
    `fake_engine()` unless one is given, a Clock, 4 rows a batch and no wait for company unless `settings` say
    otherwise."""
    made = []

    async def make(engine=None, **kw):
        engine = engine or fake_engine()
        kw.setdefault("clock", Clock())
        kw.setdefault("max_batch_size", 4)
        kw.setdefault("batch_wait_s", 0.0)
        s = Scheduler(engine, LatentCache(16, None, "test"), **kw)
        await s.start()
        made.append(s)
        return s, engine

    yield make
    for s in made:
        await s.close()


@pytest.fixture(scope="session")
def tiny_static_engine(tiny_checkpoint):
    """The tiny engine on the static KV cache (preallocated slots; XTTS_KV_CACHE=static), which a CPU's auto does
    not pick: the engine's promises are checked on both running batches."""
    from batching.engine import XttsEngine

    return XttsEngine.load(tiny_checkpoint, device="cpu", kv_cache="static")


@pytest.fixture(params=["dynamic", "static"])
def any_cache_engine(request, tiny_engine, tiny_static_engine):
    """The tiny engine on each KV cache in turn (tiny_engine is the dynamic one on a CPU)."""
    engine = tiny_engine if request.param == "dynamic" else tiny_static_engine
    assert engine.kv_cache == request.param
    return engine
