"""The running batch on preallocated slots (batching/static_batch.py), on a tiny demo checkpoint: greedy rows
equal stock `Xtts.inference`; a seeded row is the same alone, beside others, joined late, in a reused slot and
after the buffers grow, and the same as RunningBatch's; rows join and leave without their neighbours' keys and
values being copied."""

import numpy as np
import pytest
import torch

from batching.engine import SamplingParams, Segment
from batching.running import RunningBatch
from batching.static_batch import COLUMN_BLOCK, FIRST_COLUMNS, FIRST_SLOTS, StaticBatch, slot_bucket
from testing.stock_reference import stock_inference
from testing.tolerances import WAVEFORM_TOLERANCE
from testing.voices import synthetic_voice

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def voices(tiny_engine):
    return [tiny_engine.condition(synthetic_voice(3.0, f0=f0, seed=i), 22050) for i, f0 in enumerate((120, 210))]


def run(batch, joins: dict[int, list[tuple[object, Segment]]], evict: dict[int, list] | None = None):
    """Step the batch, admitting (and evicting) rows at the given step numbers; returns {key: FinishedRow}."""
    finished, step = {}, 0
    with torch.inference_mode():
        while len(batch) or any(s >= step for s in joins):
            if step in (evict or {}):
                batch.evict(evict[step])
            if step in joins:
                keys, segments = zip(*joins[step], strict=True)
                batch.admit(list(keys), list(segments))
            for row in batch.step().finished:
                finished[row.key] = row
            step += 1
    return finished


def segment(engine, text, lang, voice, params):
    return Segment(engine.tokenize(text, lang), len(text), voice, params)


def test_greedy_rows_joining_at_steps_0_5_37_equal_stock_inference(tiny_engine, voices):
    texts = [("A rather long first sentence keeps this batch running.", "en"),
             ("Olá, tudo bem?", "pt"), ("Привет, друзья!", "ru"), ("Late one.", "en")]  # fmt: skip
    rows = [(i, segment(tiny_engine, t, lang, voices[i % 2], GREEDY)) for i, (t, lang) in enumerate(texts)]
    batch = StaticBatch(tiny_engine)
    finished = run(batch, {0: rows[:1], 5: rows[1:3], 37: rows[3:]})
    assert batch.kv_shape is None and batch.kv_positions == 0 and not batch.kv  # drained: buffers given back
    wavs = tiny_engine.vocode([finished[i] for i in range(len(texts))])
    for i, (text, lang) in enumerate(texts):
        codes, wav = stock_inference(tiny_engine, text, lang, voices[i % 2], do_sample=False, repetition_penalty=5.0)
        np.testing.assert_array_equal(finished[i].codes, codes, err_msg=f"row {i}: {text!r}")
        assert np.abs(wavs[i] - wav).max() < WAVEFORM_TOLERANCE, f"row {i}"


def sampled_rows(engine, voices):
    texts = [("Same codes, whenever it joins and beside whom.", "en"),
             ("Uma frase bem comprida para abrir o lote, sim.", "pt"), ("Curta.", "pt"), ("Outra frase média.", "pt")]
    params = [SamplingParams(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=2.0, seed=4321),
              SamplingParams(temperature=0.5, top_k=10, seed=7), SamplingParams(temperature=0.6, seed=8),
              SamplingParams(temperature=0.9, top_p=0.7, seed=9)]  # fmt: skip
    return [segment(engine, t, lang, voices[i % 2], p) for i, ((t, lang), p) in enumerate(zip(texts, params))]


def test_a_seeded_row_is_the_same_alone_beside_others_late_and_as_running_batch_gives_it(tiny_engine, voices):
    row, *others = sampled_rows(tiny_engine, voices)
    alone = run(StaticBatch(tiny_engine), {0: [("row", row)]})["row"]
    together = run(StaticBatch(tiny_engine), {0: [("a", others[0]), ("row", row), ("b", others[1])]})
    late = run(StaticBatch(tiny_engine), {0: [("a", others[0])], 3: [("b", others[1])],
                                          11: [("row", row), ("c", others[2])]})["row"]  # fmt: skip
    dynamic = run(RunningBatch(tiny_engine), {0: [("a", others[0]), ("row", row), ("b", others[1])]})
    for other in (together["row"], late, dynamic["row"]):
        np.testing.assert_array_equal(other.codes, alone.codes)
        assert torch.allclose(other.latents, alone.latents, atol=1e-5)
    for key in ("a", "b"):  # the neighbours too, against the dynamic layout
        np.testing.assert_array_equal(together[key].codes, dynamic[key].codes)


def test_rows_leave_and_join_without_copying_their_neighbours(tiny_engine, voices):
    row, *others = sampled_rows(tiny_engine, voices)
    batch = StaticBatch(tiny_engine, keep_buffers=True)
    with torch.inference_mode():
        batch.admit(["a", "b", "c"], others)
        for _ in range(3):
            batch.step()
        buffers = [(k.data_ptr(), v.data_ptr()) for k, v in batch.kv]
        generation = batch.generation
        a_keys = batch.kv[0][0][0, :, : batch.lengths[0]].clone()
        assert batch.evict(["b", "nobody"]) == ["b"]
        assert batch.slot_keys[:3] == ["a", None, "c"] and batch.n_slots == 3
        batch.admit(["row"], [row])  # the lowest free slot: b's
        assert batch.slot_keys[:3] == ["a", "row", "c"]
        assert [(k.data_ptr(), v.data_ptr()) for k, v in batch.kv] == buffers and batch.generation == generation
        torch.testing.assert_close(batch.kv[0][0][0, :, : a_keys.shape[1]], a_keys, rtol=0, atol=0)
    finished = run(batch, {})
    alone = run(StaticBatch(tiny_engine), {0: [("row", row)]})["row"]
    np.testing.assert_array_equal(finished["row"].codes, alone.codes)  # in a reused slot, as alone
    assert set(finished) == {"a", "c", "row"} and batch.kv  # kept buffers: slots free, memory held
    assert batch.kv_shape is None and all(k is None for k in batch.slot_keys)


def test_buffers_grow_past_their_first_size_and_rows_are_unchanged(tiny_engine, voices):
    row, *others = sampled_rows(tiny_engine, voices)
    n = FIRST_SLOTS + 3
    many = [(f"r{i}", others[i % 3]) for i in range(n - 1)]
    length = FIRST_COLUMNS - 40  # with its prefix (~80 positions), past the first columns
    long_row = Segment(row.tokens, row.n_chars, row.voice,
                       SamplingParams(seed=4321, min_new_tokens=length, max_new_tokens=length))
    batch = StaticBatch(tiny_engine)
    finished = run(batch, {0: many[:4], 2: many[4:], 5: [("long", long_row)]})
    assert batch.generation >= 3  # first allocation, more slots, more columns
    alone = run(StaticBatch(tiny_engine), {0: [("long", long_row)]})["long"]
    np.testing.assert_array_equal(finished["long"].codes, alone.codes)
    assert len(alone.codes) == length
    alone = [run(StaticBatch(tiny_engine), {0: [(i, seg)]})[i].codes for i, seg in enumerate(others)]
    for i, (key, _) in enumerate(many):  # the same segment, the same seed: the same codes in any slot
        np.testing.assert_array_equal(finished[key].codes, alone[i % 3], err_msg=key)


def test_the_step_reads_only_the_slots_and_columns_in_use(tiny_engine, voices):
    rows = sampled_rows(tiny_engine, voices)
    batch = StaticBatch(tiny_engine, keep_buffers=True)
    with torch.inference_mode():
        batch.admit(["a", "b"], rows[:2])
        longest = max(batch.lengths)
        _, heads, _, dim = batch.kv[0][0].shape
        assert batch.kv_shape == (2, heads, -(-(longest + 1) // COLUMN_BLOCK) * COLUMN_BLOCK, dim)
        batch.evict(["a"])
        assert batch.kv_shape[0] == 2  # slot 1 is in use: the step runs over slots 0 and 1
        batch.evict(["b"])
        assert batch.kv_shape is None and batch.step().keys == ()
    assert [slot_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]


def test_decoding_switches_the_engines_kv_cache_for_a_block_and_back(tiny_engine, voices):
    """batching.engine.decoding, which the GPU kit's step section times each path with: inside the block the
    engine steps on the static slots, and its seeded codes are the dynamic cache's; afterwards it is as before."""
    from batching.engine import decoding

    row = sampled_rows(tiny_engine, voices)[0]
    assert tiny_engine.kv_cache == "dynamic"  # auto on the CPU
    before = tiny_engine.generate([row])[0]
    with decoding(tiny_engine, "static") as engine:
        assert engine.kv_cache == "static" and isinstance(engine._running, StaticBatch) and engine.graphs is None
        inside = engine.generate([row])[0]
    assert tiny_engine.kv_cache == "dynamic" and isinstance(tiny_engine._running, RunningBatch)
    np.testing.assert_array_equal(inside.codes, before.codes)
    with pytest.raises(ValueError, match="XTTS_KV_CACHE must be one of"):
        with decoding(tiny_engine, "paged"):
            pass
    assert tiny_engine.kv_cache == "dynamic"
