"""The step-level engine on a tiny demo checkpoint: rows join a running batch at any step and come out as they
would alone (and as stock `Xtts.inference` gives them); the KV cache stays within its budget and empties."""

import random

import numpy as np
import pytest

from batching import policy
from batching.engine import SamplingParams, Segment
from testing.stock_reference import stock_inference
from testing.tolerances import WAVEFORM_TOLERANCE
from testing.voices import synthetic_voice

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def voices(tiny_engine):
    return [tiny_engine.condition(synthetic_voice(3.0, f0=f0, seed=i), 22050) for i, f0 in enumerate((120, 210))]


@pytest.fixture
def engine(any_cache_engine):
    """Each test that takes `engine` runs on both KV caches; those that take `tiny_engine` test the dynamic
    cache's own layout (tests/batching/test_static_batch.py tests the static one's)."""
    return any_cache_engine


def run(engine, joins: dict[int, list[tuple[object, Segment]]]):
    """Step the engine, admitting rows at the given step numbers; returns {key: FinishedRow} and the steps run."""
    assert not engine.running
    finished, step = {}, 0
    while engine.running or any(s >= step for s in joins):
        if step in joins:
            keys, segments = zip(*joins[step], strict=True)
            engine.admit(list(keys), list(segments))
        for row in engine.step().finished:
            finished[row.key] = row
        step += 1
    return finished, step


def test_greedy_rows_joining_at_steps_0_5_37_equal_stock_inference(engine, voices):
    texts = [("A rather long first sentence keeps this batch running.", "en"),  # 74 tokens
             ("Olá, tudo bem?", "pt"), ("Привет, друзья!", "ru"), ("Late one.", "en")]  # fmt: skip
    rows = [(i, Segment(engine.tokenize(t, lang), len(t), voices[i % 2], GREEDY))
            for i, (t, lang) in enumerate(texts)]  # fmt: skip
    finished, _ = run(engine, {0: rows[:1], 5: rows[1:3], 37: rows[3:]})
    assert engine.kv_shape is None and engine.kv_positions == 0
    wavs = engine.vocode([finished[i] for i in range(len(texts))])
    for i, (text, lang) in enumerate(texts):
        codes, wav = stock_inference(engine, text, lang, voices[i % 2], do_sample=False, repetition_penalty=5.0)
        np.testing.assert_array_equal(finished[i].codes, codes, err_msg=f"row {i}: {text!r}")
        assert wavs[i].shape == wav.shape
        assert np.abs(wavs[i] - wav).max() < WAVEFORM_TOLERANCE, f"row {i}"


def test_a_seeded_row_is_the_same_alone_joining_late_and_in_a_static_batch(engine, voices):
    text = "Same codes, whenever it joins and beside whom."
    seeded = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=2.0, seed=4321)
    row = Segment(engine.tokenize(text, "en"), len(text), voices[0], seeded)
    others = [Segment(engine.tokenize(t, "pt"), len(t), voices[1],
                      SamplingParams(temperature=0.5 + 0.1 * i, top_k=10 + i, seed=None))
              for i, t in enumerate(["Uma frase bem comprida para abrir o lote, sim.", "Curta.", "Outra frase média."])]
    alone, _ = run(engine, {0: [("row", row)]})
    late, _ = run(engine, {0: [("a", others[0])], 3: [("b", others[1])], 11: [("row", row), ("c", others[2])]})
    (static,) = [a for a in engine.generate([others[0], row, others[1]])][1:2]
    np.testing.assert_array_equal(late["row"].codes, alone["row"].codes)
    np.testing.assert_array_equal(static.codes, alone["row"].codes)
    (other_seed,) = engine.generate([Segment(row.tokens, row.n_chars, row.voice, SamplingParams(seed=1))])
    assert not np.array_equal(other_seed.codes, alone["row"].codes)


def test_row_limits_come_from_the_sampling_parameters(engine, voices):
    text = "Limits per row."
    tokens = engine.tokenize(text, "en")
    rows = [("rule", Segment(tokens, len(text), voices[0], GREEDY)),
            ("seven", Segment(tokens, len(text), voices[0], SamplingParams(do_sample=False, min_new_tokens=7,
                                                                            max_new_tokens=7)))]  # fmt: skip
    finished, _ = run(engine, {0: rows})
    assert len(finished["rule"].codes) == engine.demo_length(len(text))
    assert len(finished["seven"].codes) == 7
    np.testing.assert_array_equal(finished["seven"].codes, finished["rule"].codes[:7])


def test_evicted_rows_leave_and_padding_is_compacted(tiny_engine, voices):
    long_text, short_text = "A long row that will be evicted before it ends.", "Hi."
    long_row = Segment(tiny_engine.tokenize(long_text, "en"), len(long_text), voices[0], GREEDY)
    short_row = Segment(tiny_engine.tokenize(short_text, "en"), 40, voices[1], GREEDY)  # 56 tokens, short prefix
    tiny_engine.admit(["long"], [long_row])
    for _ in range(3):
        tiny_engine.step()
    tiny_engine.admit(["short"], [short_row])
    tiny_engine.step()
    rows, _, cols, _ = tiny_engine.kv_shape
    assert rows == 2 and cols == 32 + len(long_row.tokens) + 2 + 4  # the short row is left-padded to the long one
    assert tiny_engine.evict(["long", "nobody"]) == ["long"]
    assert tiny_engine.running == ("short",)
    assert tiny_engine.kv_shape[0] == 1 and tiny_engine.kv_shape[2] == 32 + len(short_row.tokens) + 2 + 1
    assert tiny_engine.evict(["short"]) == ["short"]
    assert tiny_engine.kv_shape is None


def test_cache_stays_within_its_budget_over_hundreds_of_steps_and_empties(tiny_engine, voices):
    rng = random.Random(7)
    words = "uma frase de tamanho variado para ver o cache crescer e encolher".split()
    arrivals: dict[int, list[Segment]] = {}
    for i in range(24):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        seg = Segment(tiny_engine.tokenize(text, "pt"), len(text), voices[i % 2], SamplingParams(seed=i))
        arrivals.setdefault(rng.randint(0, 300), []).append(seg)
    budget = 3 * max(tiny_engine.reserve_positions(s) for segs in arrivals.values() for s in segs)
    waiting, segments, spans, done, order = {}, {}, {}, 0, 0
    shapes = []
    step = 0
    while step <= 300 or waiting or tiny_engine.running:
        for seg in arrivals.get(step, []):
            spans[order] = tiny_engine.reserve_positions(seg)
            waiting[order] = policy.Waiting(order, "v", len(seg.tokens), float(step), order, spans[order])
            segments[order] = seg
            order += 1
        decision = policy.next_admission(
            list(waiting.values()), float(step), running_rows=len(tiny_engine.running),
            running_span=max((spans[k] for k in tiny_engine.running), default=0),
            max_rows=8, max_positions=budget, batch_wait_s=0.0,
        )  # fmt: skip
        if isinstance(decision, policy.Batch) and decision.keys:
            tiny_engine.admit(list(decision.keys), [segments[k] for k in decision.keys])
            for k in decision.keys:
                del waiting[k]
        if tiny_engine.running:
            done += len(tiny_engine.step().finished)
            shape = tiny_engine.kv_shape
            if shape is not None:
                shapes.append(shape)
                assert shape[0] * shape[2] <= budget, (step, shape, budget)
        step += 1
    assert done == 24 and step > 300
    assert max(s[0] for s in shapes) >= 3  # rows really ran together
    assert tiny_engine.kv_shape is None and tiny_engine.kv_positions == 0 and not tiny_engine.running
