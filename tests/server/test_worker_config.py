"""server.config.WorkerConfig: one frozen object from the environment, every bad value named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from server.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_CONCURRENCY, ConfigError, WorkerConfig
from testing.worker_config import SECRET, FakeStorageConfig, build

def test_defaults_from_an_empty_environment():
    config = build({})
    assert dataclasses.asdict(config) | {"storage": None} == dataclasses.asdict(WorkerConfig())
    assert config.model_dir is None and config.model == "xtts_v2"
    assert (config.device, config.gpt_dtype) == ("auto", "auto")
    assert (config.max_concurrency, config.max_batch_size) == (32, 8)
    assert (config.batch_wait_ms, config.latent_cache_size, config.max_text_chars) == (15.0, 256, 5000)
    assert (config.job_timeout_s, config.metrics_port, config.log_level) == (600.0, 9090, "INFO")
    assert (config.default_language, config.default_output_format) == ("pt", "wav")
    assert isinstance(config.storage, FakeStorageConfig)


def test_default_concurrency_leaves_room_above_the_batch_size():
    # The SDK pauses 1 s when every slot is busy: several batches' worth of jobs must be held at once.
    assert DEFAULT_MAX_CONCURRENCY >= 4 * DEFAULT_MAX_BATCH_SIZE
    assert build({}).advisories() == []
    assert "1 s" in build({"MAX_CONCURRENCY": "8"}).advisories()[0]
    assert "benchmark baseline" in build({"XTTS_ENGINE": "stock"}).advisories()[0]


def test_every_variable_is_read_and_normalized():
    env = {
        "XTTS_MODEL_DIR": "/models/xtts", "XTTS_MODEL": "xtts_v2", "XTTS_DEVICE": "CUDA:1",
        "XTTS_GPT_DTYPE": "BFloat16", "MAX_CONCURRENCY": "64", "MAX_BATCH_SIZE": "16", "BATCH_WAIT_MS": "2.5",
        "LATENT_CACHE_SIZE": "10", "MAX_TEXT_CHARS": "100", "JOB_TIMEOUT_S": "30", "METRICS_PORT": "0",
        "LOG_LEVEL": "warn", "DEFAULT_LANGUAGE": "ZH_CN", "DEFAULT_OUTPUT_FORMAT": "MP3",
        "LATENT_CACHE_DIR": "/var/latents", "LATENT_CACHE_DISK_ENTRIES": "50", "XTTS_VOCODER_BATCHING": "Per_Row",
        "LATENT_CACHE": "OFF", "XTTS_ENGINE": "Stock", "SCHEDULING": "Static", "MAX_BATCH_TOKENS": "20000",
        "REF_MIN_LEVEL_DBFS": "-60", "VOCODER_SPAN_S": "4", "STREAMING": "ON", "STREAM_FIRST_CHUNK_S": "0.25",
        "STREAM_MAX_CHUNK_S": "6", "METRICS_HOST": "127.0.0.1", "STREAM_BUFFER_S": "90", "STREAM_AGGREGATE": "Off",
    }  # fmt: skip
    config = build(env)
    assert config.latent_cache_disk_entries == 50
    assert config.summary() == {
        "model_dir": "/models/xtts", "model": "xtts_v2", "device": "cuda:1", "gpt_dtype": "bfloat16",
        "max_concurrency": 64, "max_batch_size": 16, "batch_wait_ms": 2.5, "latent_cache_size": 10,
        "latent_cache": False, "latent_cache_dir": "/var/latents", "vocoder_batching": "per_row",
        "engine": "stock", "max_text_chars": 100, "job_timeout_s": 30.0, "metrics_port": 0, "log_level": "WARNING",
        "default_language": "zh-cn", "default_output_format": "mp3", "max_batch_tokens": 20000,
        "scheduling": "static", "ref_min_level_dbfs": -60.0, "vocoder_span_s": 4.0, "streaming": True,
        "stream_first_chunk_s": 0.25, "stream_max_chunk_s": 6.0, "server_mode": "queue",
            "metrics_host": "127.0.0.1", "stream_buffer_s": 90.0, "stream_aggregate": False,
    }  # fmt: skip
    assert config.storage.env == env  # storage gets the same environment to read its own variables


def test_empty_values_count_as_unset():
    config = build({"MAX_CONCURRENCY": "", "XTTS_MODEL_DIR": "  ", "LOG_LEVEL": ""})
    assert (config.max_concurrency, config.model_dir, config.log_level) == (32, None, "INFO")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_CONCURRENCY", "0", "MAX_CONCURRENCY must be an integer >= 1, got '0'"),
        ("MAX_CONCURRENCY", "eight", "MAX_CONCURRENCY must be an integer >= 1, got 'eight'"),
        ("MAX_BATCH_SIZE", "2.5", "MAX_BATCH_SIZE must be an integer >= 1, got '2.5'"),
        ("MAX_BATCH_SIZE", "1_000", "MAX_BATCH_SIZE must be an integer >= 1, got '1_000'"),  # plain decimal only
        ("BATCH_WAIT_MS", "1_5", "BATCH_WAIT_MS must be a number >= 0, got '1_5'"),
        ("LATENT_CACHE_SIZE", "-1", "LATENT_CACHE_SIZE must be an integer >= 1, got '-1'"),
        ("MAX_TEXT_CHARS", "0", "MAX_TEXT_CHARS must be an integer >= 1, got '0'"),
        ("METRICS_PORT", "70000", "METRICS_PORT must be an integer from 0 to 65535, got '70000'"),
        ("BATCH_WAIT_MS", "-1", "BATCH_WAIT_MS must be a number >= 0, got '-1'"),
        ("BATCH_WAIT_MS", "nan", "BATCH_WAIT_MS must be a number >= 0, got 'nan'"),
        ("JOB_TIMEOUT_S", "0", "JOB_TIMEOUT_S must be a number > 0, got '0'"),
        ("JOB_TIMEOUT_S", "inf", "JOB_TIMEOUT_S must be a number > 0, got 'inf'"),
        ("XTTS_DEVICE", "tpu", "XTTS_DEVICE must be one of cuda, cuda:N, cpu, auto, got 'tpu'"),
        ("STREAMING", "yes", "STREAMING must be one of on, off, got 'yes'"),
        ("STREAM_FIRST_CHUNK_S", "0", "STREAM_FIRST_CHUNK_S must be a number >= 0.05 and <= 10, got '0'"),
        ("STREAM_MAX_CHUNK_S", "0.1", "STREAM_MAX_CHUNK_S must be at least STREAM_FIRST_CHUNK_S (0.5), got '0.1'"),
        ("VOCODER_SPAN_S", "-1", "VOCODER_SPAN_S must be a number >= 0 and <= 60, got '-1'"),
        ("XTTS_GPT_DTYPE", "int8", "XTTS_GPT_DTYPE must be one of auto, float32, float16, bfloat16, got 'int8'"),
        ("XTTS_MODEL", "xtts_v1", "XTTS_MODEL must be one of xtts_v2, got 'xtts_v1'"),
        ("XTTS_VOCODER_BATCHING", "yes", "XTTS_VOCODER_BATCHING must be one of auto, batched, per_row, got 'yes'"),
        ("LATENT_CACHE", "maybe", "LATENT_CACHE must be one of on, off, got 'maybe'"),
        ("XTTS_ENGINE", "seed", "XTTS_ENGINE must be one of batched, stock, got 'seed'"),
        ("SCHEDULING", "dynamic", "SCHEDULING must be one of continuous, static, got 'dynamic'"),
        ("MAX_BATCH_TOKENS", "-5", "MAX_BATCH_TOKENS must be an integer >= 0, got '-5'"),
        ("LATENT_CACHE_DISK_ENTRIES", "0", "LATENT_CACHE_DISK_ENTRIES must be an integer >= 1, got '0'"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
        ("DEFAULT_OUTPUT_FORMAT", "aac", "DEFAULT_OUTPUT_FORMAT must be one of wav, flac, ogg, mp3, got 'aac'"),
        ("DEFAULT_LANGUAGE", "pt-BR", "DEFAULT_LANGUAGE must be one of pt, en, "),
    ],
)
def test_a_bad_value_is_named_with_the_variable(name, value, message):
    with pytest.raises(ConfigError) as info:
        build({name: value})
    assert str(info.value).startswith(message)
    assert info.value.error_code == "invalid_config"


def test_the_kv_cache_and_cuda_graphs_are_read_and_reach_the_engine():
    import inspect

    from batching.engine import KV_CACHES
    from batching.graphs import CUDA_GRAPH_MODES
    from server import __main__ as entry
    from server.config import CUDA_GRAPH_MODES as GRAPH_CHOICES, KV_CACHES as CACHE_CHOICES

    assert (CACHE_CHOICES, GRAPH_CHOICES) == (KV_CACHES, CUDA_GRAPH_MODES)  # the engine's own choices
    assert (build({}).kv_cache, build({}).cuda_graphs) == ("auto", "auto")
    config = build({"XTTS_KV_CACHE": " Static ", "XTTS_CUDA_GRAPHS": "ON"})
    assert (config.kv_cache, config.cuda_graphs) == ("static", "on")
    assert build({"XTTS_KV_CACHE": "dynamic", "XTTS_CUDA_GRAPHS": "off"}).kv_cache == "dynamic"
    source = inspect.getsource(entry.load_engine)
    assert "kv_cache=config.kv_cache" in source and "cuda_graphs=config.cuda_graphs" in source


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"XTTS_KV_CACHE": "paged"}, "XTTS_KV_CACHE must be one of auto, static, dynamic, got 'paged'"),
        ({"XTTS_CUDA_GRAPHS": "yes"}, "XTTS_CUDA_GRAPHS must be one of auto, on, off, got 'yes'"),
        ({"XTTS_CUDA_GRAPHS": "on", "XTTS_KV_CACHE": "dynamic"},
         "XTTS_CUDA_GRAPHS must be auto or off with XTTS_KV_CACHE=dynamic (graphs need the static cache), got 'on'"),
        ({"XTTS_CUDA_GRAPHS": "on", "XTTS_DEVICE": "cpu"},
         "XTTS_CUDA_GRAPHS must be auto or off with XTTS_DEVICE=cpu (graphs need a CUDA device), got 'on'"),
    ],
)  # fmt: skip
def test_a_bad_kv_cache_or_cuda_graphs_value_names_the_variable_and_the_choices(env, message):
    with pytest.raises(ConfigError) as info:
        build(env)
    assert str(info.value) == message
    assert info.value.error_code == "invalid_config"


def test_a_long_bad_value_is_cut_short_in_the_message():
    with pytest.raises(ConfigError) as info:
        build({"MAX_CONCURRENCY": "9" * 10_000})
    assert len(str(info.value)) < 200


def test_config_is_frozen_and_its_repr_hides_storage_secrets():
    config = build({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_concurrency = 1
    assert SECRET not in repr(config) and SECRET not in str(config.summary())


def test_by_default_the_real_storage_config_reads_its_variables_from_the_same_environment(tmp_path):
    env = {
        "MAX_BATCH_SIZE": "4", "JOB_TIMEOUT_S": "30",  # the server's own
        "LOCAL_STORAGE_DIR": str(tmp_path / "objects"), "AUDIO_CACHE_DIR": str(tmp_path / "cache"),
        "AUDIO_CACHE_MAX_BYTES": "2000000", "MAX_REF_BYTES": "1000000", "SIGNED_URL_TTL_S": "3600",
        "STORAGE_TIMEOUT_S": "7", "STORAGE_MAX_RETRIES": "2", "STORAGE_RETRY_DEADLINE_S": "9",
        "ALLOWED_BUCKETS": "refs-a,refs-b",
    }  # fmt: skip
    config = WorkerConfig.from_env(env)
    storage = config.storage
    assert type(storage).__module__ == "storage.config" and type(storage).__name__ == "StorageConfig"
    assert (config.max_batch_size, config.job_timeout_s) == (4, 30.0)
    assert (storage.backend, storage.local_dir) == ("local", tmp_path / "objects")
    assert storage.cache_dir == tmp_path / "cache"
    assert (storage.cache_max_bytes, storage.max_ref_bytes, storage.signed_url_ttl_s) == (2_000_000, 1_000_000, 3600)
    assert (storage.timeout_s, storage.max_retries, storage.retry_deadline_s) == (7.0, 2, 9.0)
    assert storage.allowed_buckets == frozenset({"refs-a", "refs-b"})


def test_real_gcs_credentials_stay_out_of_the_configs_repr_and_summary(service_account):
    data = json.loads(service_account.json)
    key_line = data["private_key"].strip().splitlines()[1]
    config = WorkerConfig.from_env({"GCS_BUCKET_NAME": "results", "GCS_CREDENTIALS": service_account.json})
    assert (config.storage.backend, config.storage.bucket) == ("gcs", "results")
    assert config.storage.has_private_key  # the real StorageConfig holds the key ...
    for text in (repr(config), str(config), str(config.summary())):  # ... and none of it shows here
        assert key_line not in text and data["private_key_id"] not in text


def test_a_bad_server_variable_fails_before_storage_is_read():
    def storage_must_not_run(env):
        raise AssertionError("storage read before the server's own variables were checked")

    with pytest.raises(ConfigError, match="MAX_BATCH_SIZE"):
        WorkerConfig.from_env({"MAX_BATCH_SIZE": "0"}, storage_from_env=storage_must_not_run)


def test_the_real_storage_config_is_built_and_its_errors_pass_through(tmp_path):
    from storage import StorageConfig, StorageNotConfiguredError

    config = WorkerConfig.from_env({"LOCAL_STORAGE_DIR": str(tmp_path), "MAX_BATCH_SIZE": "4"})
    assert isinstance(config.storage, StorageConfig) and config.storage.backend == "local"
    assert config.max_batch_size == 4
    with pytest.raises(StorageNotConfiguredError, match="STORAGE_BACKEND"):
        WorkerConfig.from_env({"STORAGE_BACKEND": "s3"})
