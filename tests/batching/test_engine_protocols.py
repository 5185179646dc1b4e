"""The engine seam (batching/protocols.py): the real engines and the test fakes have every member the scheduler and
the running batches use, with the Protocol's call signatures. `isinstance` with a runtime-checkable Protocol
checks names only; here each method's parameters (names, kinds, defaults) are compared with `inspect`, a property
must be readable on an instance, and a ClassVar must be set on the class itself."""

from __future__ import annotations

import inspect
import typing
from typing import Protocol

import pytest
import torch

from batching.engine import Segment, VoiceLatents, XttsEngine
from batching.params import SamplingParams
from batching.protocols import BatchEngine, DecoderHost, SpanVocoder, StepEngine
from batching.stock import StockEngine
from batching.vocoder import RowVocoder
from testing.fake_engine import FakeEngine, FakeSpanVocoder, FakeStepEngine


def protocol_members(protocol: type) -> dict[str, str]:
    """name -> "method", "property", "classvar" or "data", over the protocol and the Protocols it extends."""
    members: dict[str, str] = {}
    for base in reversed(protocol.__mro__):
        if base in (Protocol, typing.Generic, object) or not getattr(base, "_is_protocol", False):
            continue
        hints = typing.get_type_hints(base, include_extras=True) if base.__dict__.get("__annotations__") else {}
        for name in base.__dict__.get("__annotations__", {}):
            kind = "classvar" if typing.get_origin(hints.get(name)) is typing.ClassVar else "data"
            members[name] = kind
        for name, value in base.__dict__.items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                members[name] = "property"
            elif inspect.isfunction(value):
                members[name] = "method"
    return members


def _shape(fn) -> list[tuple[str, object, bool]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]


def mismatches(protocol: type, impl: object) -> list[str]:
    """What `impl` (an instance) lacks or spells differently from `protocol`; empty when it satisfies it."""
    cls = type(impl)
    problems = []
    for name, kind in protocol_members(protocol).items():
        if not hasattr(impl, name):
            problems.append(f"{cls.__name__} has no {name}")
            continue
        if kind == "classvar" and not any(name in k.__dict__ for k in cls.__mro__):
            problems.append(f"{cls.__name__}.{name} must be a class attribute, not set per instance")
        if kind == "property" and callable(getattr(impl, name)):
            problems.append(f"{cls.__name__}.{name} must be a value or a property, not a method")
        if kind != "method":
            continue
        method = inspect.getattr_static(impl, name)
        if not callable(getattr(impl, name)) or isinstance(method, property):
            problems.append(f"{cls.__name__}.{name} must be a method")
            continue
        want = _shape(getattr(protocol, name))
        got = _shape(getattr(cls, name))
        extra = got[len(want):]
        if got[: len(want)] != want or any(not has_default for _, _, has_default in extra):
            problems.append(f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} differs from "
                            f"{protocol.__name__}.{name}{inspect.signature(getattr(protocol, name))}")  # fmt: skip
    return problems


def _segment() -> Segment:
    return Segment((1, 2, 3), 3, VoiceLatents(torch.zeros(1, 32, 4), torch.zeros(1, 512, 1)), SamplingParams())


@pytest.mark.parametrize("engine", [FakeEngine, FakeStepEngine], ids=lambda c: c.__name__)
def test_the_fakes_are_whole_batch_engines(engine):
    assert mismatches(BatchEngine, engine()) == []
    assert isinstance(engine(), BatchEngine)


def test_the_step_fake_is_a_step_engine_and_its_span_vocoder_a_span_vocoder():
    fake = FakeStepEngine()
    assert fake.supports_steps is True
    assert mismatches(StepEngine, fake) == []
    assert mismatches(SpanVocoder, fake.row_vocoder(_segment())) == []
    assert mismatches(SpanVocoder, FakeSpanVocoder()) == []
    assert FakeEngine.supports_steps is False


def test_the_real_engine_is_a_step_engine_and_hosts_the_running_batches(tiny_engine):
    assert type(tiny_engine) is XttsEngine and tiny_engine.supports_steps is True
    assert mismatches(StepEngine, tiny_engine) == []
    assert mismatches(DecoderHost, tiny_engine) == []
    vocoder = tiny_engine.row_vocoder(_segment())
    assert isinstance(vocoder, RowVocoder)
    assert mismatches(SpanVocoder, vocoder) == []


def test_the_stock_engine_is_a_whole_batch_engine(tiny_stock_engine):
    assert type(tiny_stock_engine) is StockEngine and StockEngine.supports_steps is False
    assert mismatches(BatchEngine, tiny_stock_engine) == []
    assert mismatches(DecoderHost, tiny_stock_engine) == []


def test_the_checker_catches_a_missing_member_a_wrong_signature_and_a_per_instance_class_attribute():
    class Partial:
        sample_rate = 1000
        last_vocoder_s = None

        def __init__(self):
            self.supports_steps = False  # per instance: the Protocol wants it on the class

        def prepare_text(self, text):  # the language is missing
            return []

        def generate(self, segments, extra):  # an extra parameter without a default
            return []

    problems = mismatches(BatchEngine, Partial())
    assert any("has no condition" in p for p in problems), problems
    assert any("prepare_text" in p for p in problems), problems
    assert any("generate" in p for p in problems), problems
    assert any("supports_steps must be a class attribute" in p for p in problems), problems

    class Renamed(FakeEngine):
        def condition(self, audio, sample_rate):  # the first parameter renamed
            return None

    assert any("condition" in p for p in mismatches(BatchEngine, Renamed())), "a renamed parameter went unseen"

    class MethodForProperty(FakeStepEngine):
        def running(self):
            return ()

    assert any("running" in p for p in mismatches(StepEngine, MethodForProperty()))


def test_the_protocols_list_what_the_scheduler_uses():
    """A member the scheduler or a running batch reads must be declared (so no module needs to probe for it)."""
    assert {"supports_steps", "sample_rate", "last_vocoder_s", "prepare_text", "condition", "generate"} <= set(
        protocol_members(BatchEngine))
    assert {"max_row_positions", "vocoder_batched", "vocoder_hop", "reserve_positions", "admit", "step", "evict",
            "reset", "running", "kv_positions", "vocode", "row_vocoder", "latents_of", "vocode_span",
            "release_memory"} <= set(protocol_members(StepEngine))  # fmt: skip
    assert protocol_members(BatchEngine)["supports_steps"] == "classvar"
    assert protocol_members(StepEngine)["running"] == "property"
