"""server.config for SERVER_MODE=http: its variables (HOST, PORT, PORT_HEALTH, API_KEY, VOICE_REF_URL_TEMPLATE) are
read and checked only in that mode, every bad value named; the API key never shows in repr() or summary()."""

from __future__ import annotations

import pytest

from server.config import ConfigError
from testing.worker_config import build

KEY = "sk-live-PLANTED-0f9e8d7c"


def test_queue_mode_is_the_default_and_ignores_the_http_variables():
    config = build({"PORT": "not a port", "API_KEY": KEY, "VOICE_REF_URL_TEMPLATE": "{nope}"})
    assert config.server_mode == "queue" and config.api_key is None and config.voice_ref_url_template is None
    assert config.summary()["server_mode"] == "queue" and "port" not in config.summary()


def test_http_mode_reads_its_variables():
    config = build({"SERVER_MODE": "HTTP", "HOST": "127.0.0.1", "PORT": "8080", "PORT_HEALTH": "8081",
                    "API_KEY": KEY, "VOICE_REF_URL_TEMPLATE": "gs://b/voices/{voice}.wav"})  # fmt: skip
    assert (config.server_mode, config.host, config.port, config.port_health) == ("http", "127.0.0.1", 8080, 8081)
    assert config.api_key == KEY and config.voice_ref_url_template == "gs://b/voices/{voice}.wav"
    summary = config.summary()
    assert {k: summary[k] for k in ("server_mode", "host", "port", "port_health", "voice_ref_url_template",
                                    "api_key_required")} == {  # fmt: skip
        "server_mode": "http", "host": "127.0.0.1", "port": 8080, "port_health": 8081,
        "voice_ref_url_template": "gs://b/voices/{voice}.wav", "api_key_required": True,
    }  # fmt: skip
    assert KEY not in repr(config) and KEY not in str(summary)


def test_http_defaults():
    config = build({"SERVER_MODE": "http"})
    assert (config.host, config.port, config.port_health, config.api_key) == ("0.0.0.0", 8000, 8000, None)
    assert build({"SERVER_MODE": "http", "PORT": "9000"}).port_health == 9000  # PORT_HEALTH follows PORT
    assert any("without API_KEY" in note for note in config.advisories())
    assert any("STREAMING=on has no effect" in note for note in build({"SERVER_MODE": "http", "STREAMING": "on",
                                                                        "API_KEY": KEY}).advisories())  # fmt: skip
    # The SDK's 1 s pause does not exist in HTTP mode: no advice about MAX_CONCURRENCY there.
    assert build({"SERVER_MODE": "http", "API_KEY": KEY, "MAX_CONCURRENCY": "4"}).advisories() == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVER_MODE": "web"}, "SERVER_MODE must be one of queue, http, got 'web'"),
        ({"PORT": "0"}, "PORT must be an integer from 1 to 65535, got '0'"),
        ({"PORT": "80.5"}, "PORT must be an integer from 1 to 65535, got '80.5'"),
        ({"PORT_HEALTH": "65536"}, "PORT_HEALTH must be an integer from 1 to 65535, got '65536'"),
        ({"PORT": "9090"}, "PORT must be a port other than METRICS_PORT (9090), got '9090'"),
        ({"PORT_HEALTH": "9100", "METRICS_PORT": "9100"},
         "PORT_HEALTH must be a port other than METRICS_PORT (9100), got '9100'"),
        ({"VOICE_REF_URL_TEMPLATE": "gs://b/voices/v.wav"}, "VOICE_REF_URL_TEMPLATE must be a URL with one {voice}"),
        ({"VOICE_REF_URL_TEMPLATE": "gs://b/{voice}/{voice}.wav"}, "VOICE_REF_URL_TEMPLATE must be a URL with one"),
        ({"VOICE_REF_URL_TEMPLATE": "gs://b/{lang}/{voice}.wav"}, "and no other braces"),
        ({"HTTP_WRITE_TIMEOUT_S": "0"}, "HTTP_WRITE_TIMEOUT_S must be a number >= 1 and <= 600, got '0'"),
        ({"HTTP_READ_TIMEOUT_S": "601"}, "HTTP_READ_TIMEOUT_S must be a number >= 1 and <= 600, got '601'"),
        ({"HTTP_KEEPALIVE_S": "inf"}, "HTTP_KEEPALIVE_S must be a number >= 1 and <= 3600, got 'inf'"),
        ({"HTTP_MAX_CONNECTIONS": "8"}, "HTTP_MAX_CONNECTIONS must be an integer from 16 to 1000000, got '8'"),
        ({"HTTP_REF_AUDIO_URL": "no"}, "HTTP_REF_AUDIO_URL must be one of on, off, got 'no'"),
    ],
)  # fmt: skip
def test_bad_http_values_are_named(env, message):
    with pytest.raises(ConfigError) as caught:
        build({"SERVER_MODE": "http", **env})
    assert message in str(caught.value)


def test_http_limits_are_read_with_safe_defaults():
    config = build({"SERVER_MODE": "http"})
    assert (config.http_write_timeout_s, config.http_read_timeout_s, config.http_keepalive_s) == (30.0, 30.0, 15.0)
    assert config.http_max_connections == 1024 and config.http_ref_audio_url is True
    config = build({"SERVER_MODE": "http", "HTTP_WRITE_TIMEOUT_S": "5", "HTTP_READ_TIMEOUT_S": "7",
                    "HTTP_KEEPALIVE_S": "2.5", "HTTP_MAX_CONNECTIONS": "64", "HTTP_REF_AUDIO_URL": "OFF"})  # fmt: skip
    assert (config.http_write_timeout_s, config.http_read_timeout_s, config.http_keepalive_s) == (5.0, 7.0, 2.5)
    assert config.http_max_connections == 64 and config.http_ref_audio_url is False
    assert {k: v for k, v in config.summary().items() if k.startswith("http_")} == {
        "http_ref_audio_url": False, "http_write_timeout_s": 5.0, "http_read_timeout_s": 7.0,
        "http_keepalive_s": 2.5, "http_max_connections": 64,
    }  # fmt: skip
    assert build({"HTTP_MAX_CONNECTIONS": "1"}).http_max_connections == 1024  # queue mode: not read


def test_an_empty_api_key_counts_as_unset():
    assert build({"SERVER_MODE": "http", "API_KEY": "  "}).api_key is None
