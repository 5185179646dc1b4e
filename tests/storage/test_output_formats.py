"""storage.audio.OUTPUT_FORMATS: the one table of output formats, and that every encoder and name follows it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from storage import CONTENT_TYPES, SUPPORTED_OUTPUT_FORMATS
from storage.audio import (
    OUTPUT_FORMATS, RESPONSE_FORMATS, RESPONSE_TABLE, StreamEncoder, encode, encode_whole, pcm_s16le,
)  # fmt: skip
from storage.results import result_object_name

SR = 24000


def test_the_table_gives_each_format_its_container_codec_type_and_extension():
    assert {name: (row.container, row.codec, row.content_type, row.extension) for name, row in OUTPUT_FORMATS.items()
            if row.container is not None} == {
        "wav": ("WAV", "PCM_16", "audio/wav", "wav"), "flac": ("FLAC", "PCM_16", "audio/flac", "flac"),
        "ogg": ("OGG", "VORBIS", "audio/ogg", "ogg"), "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg", "mp3"),
        "opus": ("OGG", "OPUS", "audio/ogg; codecs=opus", "opus"),
    }  # fmt: skip
    assert (OUTPUT_FORMATS["pcm"].content_type, OUTPUT_FORMATS["aac"].content_type) == ("audio/pcm", "audio/aac")
    assert all(name == row.name for name, row in OUTPUT_FORMATS.items())


def test_the_lists_are_views_of_the_table():
    assert SUPPORTED_OUTPUT_FORMATS == ("wav", "flac", "ogg", "mp3")  # a queue job's output_format, in this order
    assert all(OUTPUT_FORMATS[name].stored for name in SUPPORTED_OUTPUT_FORMATS)
    assert CONTENT_TYPES == {name: OUTPUT_FORMATS[name].content_type for name in SUPPORTED_OUTPUT_FORMATS}
    assert RESPONSE_FORMATS == ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's, in OpenAI's order
    assert all(RESPONSE_TABLE[name] is OUTPUT_FORMATS[name] for name in RESPONSE_FORMATS)
    assert set(OUTPUT_FORMATS) == set(SUPPORTED_OUTPUT_FORMATS) | set(RESPONSE_FORMATS)


@pytest.mark.parametrize("fmt", SUPPORTED_OUTPUT_FORMATS)
def test_a_stored_format_is_encoded_and_named_as_the_table_says(fmt):
    data, content_type = encode(np.zeros(2400, dtype=np.float32), SR, fmt)
    row = OUTPUT_FORMATS[fmt]
    assert content_type == row.content_type
    assert sf.info(io.BytesIO(data)).format == row.container
    assert result_object_name("voz", fmt).endswith("." + row.extension)


@pytest.mark.parametrize("fmt", [name for name in RESPONSE_FORMATS if OUTPUT_FORMATS[name].container])
def test_a_response_format_of_libsndfile_has_the_tables_container_and_codec(fmt):
    data = encode_whole(np.zeros(4800, dtype=np.float32), SR, fmt)
    info = sf.info(io.BytesIO(data))
    row = OUTPUT_FORMATS[fmt]
    assert (info.format, info.subtype) == (row.container, row.codec)


def test_only_the_streamed_rows_have_a_stream_encoder():
    for name, row in OUTPUT_FORMATS.items():
        if row.streamed:
            StreamEncoder(name, SR)
        else:
            with pytest.raises(ValueError, match=f"{name} is not a streamed format"):
                StreamEncoder(name, SR)


def test_pcm_s16le_is_the_one_pcm_conversion():
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], dtype=np.float32)
    assert np.frombuffer(pcm_s16le(samples), "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32768]
    assert encode_whole(samples, SR, "pcm") == pcm_s16le(samples)
