"""StorageConfig.from_env: defaults, backend choice, and errors that name the variable but never the key."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest

from storage import InvalidRefUrlError, StorageConfig, StorageNotConfiguredError, parse_ref_url

SECRET = "SECRET-MARKER-5f1c"


def _fails(env: dict[str, str]) -> StorageNotConfiguredError:
    with pytest.raises(StorageNotConfiguredError) as info:
        StorageConfig.from_env(env)
    assert info.value.error_code == "storage_not_configured"
    assert str(info.value).startswith("GCS not configured correctly: ")
    return info.value


def _full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_empty_environment_gives_the_local_backend_with_documented_defaults():
    config = StorageConfig.from_env({})
    assert config.backend == "local"
    assert config.bucket == "local"
    assert config.allowed_buckets == frozenset({"local"})
    assert config.local_dir == Path("local_storage").absolute()
    assert config.cache_dir == Path("/tmp/audio_cache")
    assert config.cache_max_bytes == 5 * 1024**3
    assert config.max_ref_bytes == 50 * 1024 * 1024
    assert config.signed_url_ttl_s == 86400
    assert config.allowed_ref_hosts == ("storage.googleapis.com", "*.storage.googleapis.com")
    assert config.allow_loopback_ref_urls is False


def test_bucket_with_credentials_selects_gcs(service_account):
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": service_account.json})
    assert config.backend == "gcs"
    assert config.bucket == "my-bucket"
    assert config.allowed_buckets == frozenset({"my-bucket"})
    assert config.has_private_key
    assert service_account.email in config.credentials_description


def test_config_repr_never_shows_the_key(service_account):
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": service_account.json})
    assert "PRIVATE KEY" not in repr(config)
    assert "PRIVATE KEY" not in config.credentials_description


def test_gcs_without_bucket_names_the_variable():
    assert "GCS_BUCKET_NAME" in str(_fails({"STORAGE_BACKEND": "gcs"}))


def test_gcs_without_credentials_names_the_variable():
    assert "GCS_CREDENTIALS" in str(_fails({"GCS_BUCKET_NAME": "my-bucket"}))


def test_emulator_needs_no_credentials():
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "my-bucket", "STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})
    assert config.emulator_host == "http://127.0.0.1:4443"
    assert not config.has_private_key


@pytest.mark.parametrize("credentials", [
    '{"type": "service_account", "private_key": "' + SECRET + '", ',  # malformed JSON
    json.dumps({"type": "service_account", "client_email": "a@b.c", "private_key": SECRET}),  # not a PEM key
    json.dumps({"type": "service_account", "private_key": SECRET}),  # no client_email
    json.dumps({"type": SECRET}),
    json.dumps([SECRET]),
])
def test_malformed_credentials_fail_without_printing_them(credentials):
    error = _fails({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": credentials})
    assert "GCS_CREDENTIALS" in str(error)
    assert SECRET not in _full_traceback(error)


def test_credentials_from_a_file_path(service_account, tmp_path):
    key_file = tmp_path / "sa.json"
    key_file.write_text(service_account.json)
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": str(key_file)})
    assert config.credentials_file == str(key_file)
    assert config.credentials_json is None
    assert config.has_private_key


def test_application_default_credentials_file(service_account, tmp_path):
    key_file = tmp_path / "adc.json"
    key_file.write_text(service_account.json)
    config = StorageConfig.from_env({"GCS_BUCKET_NAME": "b-1", "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)})
    assert config.credentials_file == str(key_file)


def test_missing_credentials_file_gives_the_reason_but_not_the_value(tmp_path):
    missing = tmp_path / f"{SECRET}.json"
    error = _fails({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": str(missing)})
    assert "GCS_CREDENTIALS" in str(error) and "No such file" in str(error)
    assert SECRET not in _full_traceback(error)


def test_missing_adc_file_names_the_path(tmp_path):
    missing = tmp_path / "adc.json"
    error = _fails({"GCS_BUCKET_NAME": "my-bucket", "GOOGLE_APPLICATION_CREDENTIALS": str(missing)})
    assert str(missing) in str(error) and "No such file" in str(error)


def test_credentials_without_private_key_cannot_sign_results():
    user = json.dumps({"type": "authorized_user", "client_id": "x", "client_secret": SECRET,
                       "refresh_token": SECRET})
    error = _fails({"GCS_BUCKET_NAME": "my-bucket", "GCS_CREDENTIALS": user})
    assert "private_key" in str(error)
    assert SECRET not in _full_traceback(error)


@pytest.mark.parametrize(("name", "value", "expected"), [
    # One message shape for every variable of the worker (storage.env): "{NAME} must be {rule}, got {value!r}".
    ("MAX_REF_BYTES", "lots", "MAX_REF_BYTES must be an integer >= 1, got 'lots'"),
    ("MAX_REF_BYTES", "0", "MAX_REF_BYTES must be an integer >= 1, got '0'"),
    ("MAX_REF_BYTES", "1_000", "MAX_REF_BYTES must be an integer >= 1, got '1_000'"),  # plain decimal only
    ("SIGNED_URL_TTL_S", "700000", "SIGNED_URL_TTL_S must be an integer from 1 to 604800, got '700000'"),
    ("STORAGE_TIMEOUT_S", "nan", "STORAGE_TIMEOUT_S must be a number >= 0.01, got 'nan'"),
    ("STORAGE_MAX_RETRIES", "-1", "STORAGE_MAX_RETRIES must be an integer from 0 to 100, got '-1'"),
    ("ALLOW_LOOPBACK_REF_URLS", "maybe",
     "ALLOW_LOOPBACK_REF_URLS must be one of 1, true, yes, on, 0, false, no, off, got 'maybe'"),
    ("STORAGE_BACKEND", "s3", "STORAGE_BACKEND must be one of gcs, local, got 's3'"),
    ("GCS_BUCKET_NAME", "Bad_Bucket!", "GCS_BUCKET_NAME is not a valid bucket name: 'Bad_Bucket!'"),
    ("ALLOWED_BUCKETS", "ok-bucket,UPPER", "ALLOWED_BUCKETS contains an invalid bucket name: 'UPPER'"),
    ("ALLOWED_REF_HOSTS", "https://x.example.com", "ALLOWED_REF_HOSTS entries must be hostnames"),
    ("STORAGE_EMULATOR_HOST", "ftp://x", "STORAGE_EMULATOR_HOST must look like http://host:port, got 'ftp://x'"),
    ("ALLOWED_REF_PREFIXES", " , ", "ALLOWED_REF_PREFIXES names no prefix"),
    ("ALLOWED_REF_PREFIXES", "voices/,/abs", "ALLOWED_REF_PREFIXES entries must be object-name prefixes"),
    ("ALLOWED_REF_PREFIXES", "voices/*", "ALLOWED_REF_PREFIXES entries must be object-name prefixes"),
])
def test_bad_values_name_the_variable_and_the_value(name, value, expected):
    env = {"STORAGE_BACKEND": "local", name: value}
    if name in ("GCS_BUCKET_NAME", "STORAGE_EMULATOR_HOST"):
        env = {"GCS_BUCKET_NAME": "my-bucket", "STORAGE_EMULATOR_HOST": "127.0.0.1:1", name: value}
    assert expected in str(_fails(env))


def test_cache_bound_must_hold_one_reference():
    error = _fails({"MAX_REF_BYTES": "1000", "AUDIO_CACHE_MAX_BYTES": "999"})
    assert "AUDIO_CACHE_MAX_BYTES (999) must be >= MAX_REF_BYTES (1000)" in str(error)


def test_url_policy_settings():
    config = StorageConfig.from_env({
        "ALLOWED_BUCKETS": "a-bucket, b-bucket", "ALLOWED_REF_HOSTS": "Storage.GoogleAPIs.com,*.cdn.example.com",
        "ALLOW_LOOPBACK_REF_URLS": "true"})
    policy = config.url_policy
    assert policy.allowed_buckets == frozenset({"a-bucket", "b-bucket"})
    assert policy.allowed_hosts == ("storage.googleapis.com", "*.cdn.example.com")
    assert policy.allow_loopback
    assert StorageConfig.from_env({"ALLOWED_BUCKETS": "*"}).url_policy.allowed_buckets is None


@pytest.mark.parametrize(("value", "voice_ok", "result_ok"), [
    (None, True, False),  # the default: any object but the worker's results
    ("*", True, True),
    ("voices/, refs/", True, False),
    ("voices/,generated/", True, True),
    ("refs/", False, False),
])
def test_reference_prefixes_keep_results_apart_unless_allowed(value, voice_ok, result_ok):
    env = {"ALLOWED_BUCKETS": "a-bucket"} | ({} if value is None else {"ALLOWED_REF_PREFIXES": value})
    policy = StorageConfig.from_env(env).url_policy
    for url, ok in (("gs://a-bucket/voices/joao.wav", voice_ok),
                    ("gs://a-bucket/generated/joao_20261205_010203_0a1b2c3d.wav", result_ok),
                    ("https://storage.googleapis.com/a-bucket/generated/x.wav?X-Goog-Signature=s", result_ok)):
        if ok:
            assert parse_ref_url(url, policy).bucket == "a-bucket"
        else:
            with pytest.raises(InvalidRefUrlError, match="ALLOWED_REF_PREFIXES") as caught:
                parse_ref_url(url, policy)
            assert "X-Goog-Signature" not in str(caught.value)


def test_relative_directories_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = StorageConfig.from_env({"LOCAL_STORAGE_DIR": "data", "AUDIO_CACHE_DIR": "cache"})
    assert config.local_dir == tmp_path / "data"
    assert config.cache_dir == tmp_path / "cache"
