"""Result object names: generated/{voice_id}_{YYYYmmdd_HHMMSS}_{8 hex}.{ext}."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from storage import InvalidVoiceIdError, UnsupportedFormatError, result_object_name

WHEN = dt.datetime(2025, 12, 22, 14, 30, 52, tzinfo=dt.timezone.utc)


def test_the_seed_layout():
    assert result_object_name("joao_formal", "WAV", WHEN, "a1b2c3d4") == \
        "generated/joao_formal_20251222_143052_a1b2c3d4.wav"


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_random_suffix_and_extension(fmt):
    names = {result_object_name("v1", fmt) for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(rf"generated/v1_\d{{8}}_\d{{6}}_[0-9a-f]{{8}}\.{fmt}", name) for name in names)


def test_bad_inputs():
    with pytest.raises(InvalidVoiceIdError):
        result_object_name("../x", "wav")
    with pytest.raises(UnsupportedFormatError):
        result_object_name("v1", "aac")
    with pytest.raises(ValueError, match="8 lower-case hex"):
        result_object_name("v1", "wav", WHEN, "XYZ")
