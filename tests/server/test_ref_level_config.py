"""REF_MIN_LEVEL_DBFS: the silent-reference floor, read once into WorkerConfig and handed to the decoder."""

from __future__ import annotations

import pytest

from server.config import DEFAULT_REF_MIN_LEVEL_DBFS, ConfigError, WorkerConfig
from storage.audio import DEFAULT_MIN_LEVEL_DBFS


def build(env: dict[str, str]) -> WorkerConfig:
    return WorkerConfig.from_env(env, storage_from_env=lambda env: None)


def test_default_matches_the_decoder_default():
    assert build({}).ref_min_level_dbfs == DEFAULT_REF_MIN_LEVEL_DBFS == DEFAULT_MIN_LEVEL_DBFS


@pytest.mark.parametrize(("value", "expected"), [("-60", -60.0), (" -35.5 ", -35.5), ("0", 0.0), ("-200", -200.0),
                                                 ("off", None), ("OFF", None), ("", DEFAULT_REF_MIN_LEVEL_DBFS)])
def test_accepted_values(value, expected):
    assert build({"REF_MIN_LEVEL_DBFS": value}).ref_min_level_dbfs == expected


@pytest.mark.parametrize("value", ["loud", "5", "-201", "nan", "-inf", "1e9"])
def test_bad_values_name_the_variable_and_the_value(value):
    with pytest.raises(ConfigError) as caught:
        build({"REF_MIN_LEVEL_DBFS": value})
    assert "REF_MIN_LEVEL_DBFS must be a number from -200 to 0 (dBFS) or off" in str(caught.value)
    assert repr(value) in str(caught.value)


def test_the_handler_passes_the_floor_to_the_decoder():
    import inspect

    from server import synthesis as handler  # the job steps, where the decoder is called

    source = inspect.getsource(handler)
    assert "min_level_dbfs=ctx.config.ref_min_level_dbfs" in source
