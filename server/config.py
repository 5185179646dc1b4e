"""The worker's configuration: ONE frozen object, built once from the environment, passed down.

Every variable is read and validated here and nowhere else, through `storage.env.EnvReader`, the reader storage's
variables go through too (one set of rules: an empty value counts as unset, as RunPod's console keeps empty rows;
integers are plain decimal, `1_000` is refused; numbers are finite; LATENT_CACHE_DIR alone gives the empty value a
meaning: off). A bad value stops the worker at start with a message that names the variable and the value
(`MAX_CONCURRENCY must be an integer >= 1, got '0'`). Storage variables belong to `storage.config.StorageConfig`,
which `from_env` builds too, so the whole worker has one configuration object.

Variables read here (defaults in brackets):

    XTTS_MODEL_DIR        checkpoint folder (config.json, model.pth, vocab.json)   [unset: the released model]
    XTTS_MODEL            released model to load when XTTS_MODEL_DIR is unset      [xtts_v2]
    XTTS_DEVICE           cuda | cuda:N | cpu | auto                                [auto]
    XTTS_GPT_DTYPE        auto | float32 | float16 | bfloat16 (GPT decoder weights) [auto]
    MAX_CONCURRENCY       jobs the RunPod SDK runs at once (concurrency_modifier)  [32]
    MAX_BATCH_SIZE        most rows in one GPU batch (continuous: rows decoding at once) [8]
    MAX_BATCH_TOKENS      continuous: most KV-cache positions the running batch may come to hold, padding
                          included; 0 = MAX_BATCH_SIZE x the longest possible row (1040 for XTTS-v2), so only
                          MAX_BATCH_SIZE binds. Size it to the GPU: one position costs 2 x layers x width x
                          dtype bytes (XTTS-v2 in fp16: 2 x 30 x 1024 x 2 = 120 KiB), so 40 GiB left after the
                          model and activations hold ~350k positions                        [0]
    SCHEDULING            continuous | static: continuous admits and finishes rows at every decoding step and
                          vocodes each row as it finishes; static runs whole batches to completion [continuous]
    BATCH_WAIT_MS         longest wait for company before a batch runs (continuous: only when idle) [15]
    LATENT_CACHE          on | off: off recomputes conditioning per job (the seed's way, for baselines) [on]
    LATENT_CACHE_SIZE     speaker latents kept in memory (voices)                   [256]
    LATENT_CACHE_DIR      speaker latents persisted on disk ('' = off)             [/tmp/latent_cache]
    LATENT_CACHE_DISK_ENTRIES  most latent files kept on disk                       [2000]
    XTTS_VOCODER_BATCHING auto | batched | per_row (auto: batched on CUDA)          [auto]
    XTTS_KV_CACHE         auto | static | dynamic: the GPT's KV cache (auto: static on CUDA, dynamic on CPU) [auto]
    XTTS_CUDA_GRAPHS      auto | on | off: replay CUDA graphs of the decoding step (auto: on CUDA, after a
                          self-check; on: a failed capture or check is an error; needs the static cache) [auto]
    XTTS_ENGINE           batched | stock: stock decodes row by row as Xtts.inference (the seed's path,
                          for benchmark baselines)                                  [batched]
    MAX_TEXT_CHARS        longest gen_text accepted                                 [5000]
    JOB_TIMEOUT_S         a job still unfinished after this fails                   [600]
    METRICS_PORT          Prometheus endpoint port; 0 turns it off                  [9090]
    METRICS_HOST          the address the Prometheus endpoint listens on (0.0.0.0: reachable from outside
                          the pod, where a scraper runs; 127.0.0.1: a sidecar's only)     [0.0.0.0]
    LOG_LEVEL             DEBUG | INFO | WARNING | ERROR | CRITICAL                 [INFO]
    DEFAULT_LANGUAGE      language when a job names none                            [pt]
    DEFAULT_OUTPUT_FORMAT wav | flac | ogg | mp3 when a job names none              [wav]
    REF_MIN_LEVEL_DBFS    a reference whose loudest 50 ms window is quieter than this (dBFS, -200..0)
                          is refused as silent (invalid_audio); off turns the check off       [-50]
    VOCODER_SPAN_S        continuous, per-row vocoding (the CPU default): finished rows are vocoded in spans of
                          at most this much audio, one span per decoding step (0 = whole rows)        [8]
    STREAMING             on | off: on makes the handler a generator that streams each job's audio
                          (RunPod's /stream) before its result; a job with "stream": false does not stream [off]
    STREAM_FIRST_CHUNK_S  audio in a streamed job's first chunk (seconds, 0.05..10)             [0.5]
    STREAM_MAX_CHUNK_S    longest later chunk: each chunk doubles up to this (seconds, 0.05..10) [8]
    STREAM_BUFFER_S       most audio a stream's reader may leave unread before the stream's next segments
                          wait for it (seconds, 1..3600; a stalled reader costs no GPU time)   [60]
    STREAM_AGGREGATE      on | off (STREAMING=on, queue mode): on, the SDK sends every streamed item again in the
                          job-done POST, so /runsync and /status carry the whole stream (about 64 KB per second
                          of audio; RunPod caps /run at 10 MB and /runsync at 20 MB); off, the stream's items
                          reach /stream only and the job's output is empty                     [on]
    SERVER_MODE           queue | http: queue is RunPod's job queue (runpod.serverless.start); http serves
                          an OpenAI-compatible HTTP API (server.http_server) for a load-balancing endpoint [queue]
    (the next ones are read only with SERVER_MODE=http)
    HOST                  http: the address the HTTP server listens on                        [0.0.0.0]
    PORT                  http: the port of the API (POST /v1/audio/speech, POST /tts, GET /ping) [8000]
    PORT_HEALTH           http: the port of GET /ping; another port gets a listener of its own    [PORT]
    API_KEY               http: when set, every request but /ping needs `Authorization: Bearer <API_KEY>`
                          (a secret: never logged, never in summary())                       [unset: open]
    VOICE_REF_URL_TEMPLATE  http: a voice id's reference audio, `{voice}` standing for the id, e.g.
                          gs://my-bucket/voices/{voice}.wav; unset: each request must send ref_audio_url [unset]
    HTTP_REF_AUDIO_URL    http: on | off: off refuses a request's own ref_audio_url (400 ref_audio_forbidden), so
                          callers use only VOICE_REF_URL_TEMPLATE's voices                 [on]
    HTTP_WRITE_TIMEOUT_S  http: a client that takes no byte of its response for this long is dropped (its
                          request's rows leave the batch, its MAX_CONCURRENCY slot is freed) (1..600) [30]
    HTTP_READ_TIMEOUT_S   http: the longest a request body may take to arrive (408 request_timeout) (1..600) [30]
    HTTP_KEEPALIVE_S      http: an idle connection, or one whose request headers have not all arrived, is
                          closed after this long (1..3600)                                  [15]
    HTTP_MAX_CONNECTIONS  http: open connections on PORT past which a new one is answered 503
                          too_many_connections and closed; PORT_HEALTH's own listener takes 64 more (16..1000000;
                          at start it is lowered to fit RLIMIT_NOFILE: 832 at 1,024)       [1024]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from batching.loading import RELEASED_MODELS
from storage.audio import DEFAULT_MIN_LEVEL_DBFS, SUPPORTED_OUTPUT_FORMATS
from storage.env import EnvReader

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
GPT_DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
VOCODER_MODES: tuple[str, ...] = ("auto", "batched", "per_row")
KV_CACHES: tuple[str, ...] = ("auto", "static", "dynamic")  # batching.engine.KV_CACHES
CUDA_GRAPH_MODES: tuple[str, ...] = ("auto", "on", "off")  # batching.graphs.CUDA_GRAPH_MODES
ENGINES: tuple[str, ...] = ("batched", "stock")
SCHEDULINGS: tuple[str, ...] = ("continuous", "static")
SERVER_MODES: tuple[str, ...] = ("queue", "http")
VOICE_PLACEHOLDER = "{voice}"
DEFAULT_HTTP_PORT = 8000
DEFAULT_HTTP_WRITE_TIMEOUT_S = 30.0
DEFAULT_HTTP_READ_TIMEOUT_S = 30.0
DEFAULT_HTTP_KEEPALIVE_S = 15.0
DEFAULT_HTTP_MAX_CONNECTIONS = 1024
RELEASED_MODEL_NAMES: tuple[str, ...] = tuple(RELEASED_MODELS)

# Why MAX_CONCURRENCY defaults to 4x MAX_BATCH_SIZE: the RunPod SDK (runpod 1.12, JobScaler.get_jobs) takes new
# jobs only while fewer than `concurrency` are in flight, and when every slot is busy it sleeps a full second
# before it looks again. With concurrency close to the batch size, a finished batch frees its slots and the GPU
# then idles for up to that second (plus one job-take round trip) before the next batch can form. With several
# batches' worth of jobs held by the worker, the scheduler always has a full queue to drain while the SDK refills
# slots in the background; the jobs merely waiting cost only memory (their text and a future).
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_REF_MIN_LEVEL_DBFS = DEFAULT_MIN_LEVEL_DBFS  # the decoder's own default: one value


class ConfigError(ValueError):
    """A variable has a value the worker cannot run with. The message names the variable and the value."""

    error_code = "invalid_config"
    retryable = False


def _device(reader: EnvReader) -> str:
    value = reader.raw("XTTS_DEVICE")
    if value is None:
        return "auto"
    canonical = value.lower()
    if canonical in DEVICES:
        return canonical
    if canonical.startswith("cuda:") and canonical[5:].isdigit():
        return canonical
    reader.fail("XTTS_DEVICE", "one of cuda, cuda:N, cpu, auto", value)


def _language(reader: EnvReader) -> str:
    from batching.languages import SUPPORTED_LANGUAGES, normalize_language

    value = reader.raw("DEFAULT_LANGUAGE")
    if value is None:
        return "pt"
    try:
        return normalize_language(value)
    except Exception:  # batching's UnsupportedLanguageError: restate it in the variable's terms
        reader.fail("DEFAULT_LANGUAGE", f"one of {', '.join(SUPPORTED_LANGUAGES)}", value)


def _ref_min_level(reader: EnvReader) -> float | None:
    value = reader.raw("REF_MIN_LEVEL_DBFS")
    if value is None:
        return DEFAULT_REF_MIN_LEVEL_DBFS
    if value.lower() == "off":
        return None
    return reader.number("REF_MIN_LEVEL_DBFS", DEFAULT_REF_MIN_LEVEL_DBFS, minimum=-200.0, maximum=0.0,
                         rule="a number from -200 to 0 (dBFS) or off")


def _voice_template(reader: EnvReader) -> str | None:
    value = reader.raw("VOICE_REF_URL_TEMPLATE")
    if value is None:
        return None
    rest = value.replace(VOICE_PLACEHOLDER, "", 1)
    if VOICE_PLACEHOLDER not in value or "{" in rest or "}" in rest:
        reader.fail("VOICE_REF_URL_TEMPLATE", f"a URL with one {VOICE_PLACEHOLDER} and no other braces, such as "
                    f"gs://my-bucket/voices/{VOICE_PLACEHOLDER}.wav", value)  # fmt: skip
    return value


def _log_level(reader: EnvReader) -> str:
    value = reader.raw("LOG_LEVEL")
    if value is not None and value.upper() == "WARN":
        return "WARNING"
    return reader.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True)


def _storage_from_env(env: Mapping[str, str]) -> Any:
    # Imported here, not at the top: storage owns its variables (and its secrets); this module only asks it to
    # build its part. Its errors name its variables and are raised as they are.
    from storage.config import StorageConfig

    return StorageConfig.from_env(env)


def _with_http_settings(config: WorkerConfig, read: EnvReader) -> WorkerConfig:
    port = read.integer("PORT", DEFAULT_HTTP_PORT, minimum=1, maximum=65535)
    config = replace(
        config, host=read.raw("HOST") or "0.0.0.0", port=port,
        port_health=read.integer("PORT_HEALTH", port, minimum=1, maximum=65535),
        voice_ref_url_template=_voice_template(read), api_key=read.raw("API_KEY"),
        http_ref_audio_url=read.choice("HTTP_REF_AUDIO_URL", "on", ("on", "off")) == "on",
        http_write_timeout_s=read.number("HTTP_WRITE_TIMEOUT_S", DEFAULT_HTTP_WRITE_TIMEOUT_S, minimum=1.0,
                                         maximum=600.0),
        http_read_timeout_s=read.number("HTTP_READ_TIMEOUT_S", DEFAULT_HTTP_READ_TIMEOUT_S, minimum=1.0,
                                        maximum=600.0),
        http_keepalive_s=read.number("HTTP_KEEPALIVE_S", DEFAULT_HTTP_KEEPALIVE_S, minimum=1.0, maximum=3600.0),
        http_max_connections=read.integer("HTTP_MAX_CONNECTIONS", DEFAULT_HTTP_MAX_CONNECTIONS, minimum=16,
                                          maximum=1_000_000),
    )  # fmt: skip
    for name, value in (("PORT", config.port), ("PORT_HEALTH", config.port_health)):
        if value == config.metrics_port:
            read.fail(name, f"a port other than METRICS_PORT ({config.metrics_port})", str(value))
    return config


def _check_cuda_graphs(config: WorkerConfig, read: EnvReader) -> None:
    """XTTS_CUDA_GRAPHS=on replays the static cache's shapes on a CUDA device: refused at start where the
    settings already rule that out (the engine checks the rest once it knows its device)."""
    if config.cuda_graphs != "on":
        return
    if config.kv_cache == "dynamic":
        read.fail("XTTS_CUDA_GRAPHS", "auto or off with XTTS_KV_CACHE=dynamic (graphs need the static cache)", "on")
    if config.device == "cpu":
        read.fail("XTTS_CUDA_GRAPHS", "auto or off with XTTS_DEVICE=cpu (graphs need a CUDA device)", "on")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker reads from its environment. Build it with `WorkerConfig.from_env(os.environ)`."""

    model_dir: str | None = None
    model: str = "xtts_v2"
    device: str = "auto"
    gpt_dtype: str = "auto"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_tokens: int = 0
    scheduling: str = "continuous"
    batch_wait_ms: float = 15.0
    latent_cache: bool = True
    latent_cache_size: int = 256
    latent_cache_dir: str | None = "/tmp/latent_cache"
    latent_cache_disk_entries: int = 2000
    vocoder_batching: str = "auto"
    kv_cache: str = "auto"
    cuda_graphs: str = "auto"
    engine: str = "batched"
    max_text_chars: int = 5000
    job_timeout_s: float = 600.0
    metrics_port: int = 9090
    metrics_host: str = "0.0.0.0"
    log_level: str = "INFO"
    default_language: str = "pt"
    default_output_format: str = "wav"
    ref_min_level_dbfs: float | None = DEFAULT_REF_MIN_LEVEL_DBFS
    vocoder_span_s: float = 8.0
    streaming: bool = False
    stream_first_chunk_s: float = 0.5
    stream_max_chunk_s: float = 8.0
    stream_buffer_s: float = 60.0
    stream_aggregate: bool = True
    server_mode: str = "queue"
    host: str = "0.0.0.0"
    port: int = DEFAULT_HTTP_PORT
    port_health: int = DEFAULT_HTTP_PORT
    voice_ref_url_template: str | None = None
    http_ref_audio_url: bool = True
    http_write_timeout_s: float = DEFAULT_HTTP_WRITE_TIMEOUT_S
    http_read_timeout_s: float = DEFAULT_HTTP_READ_TIMEOUT_S
    http_keepalive_s: float = DEFAULT_HTTP_KEEPALIVE_S
    http_max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS
    # A secret: never in repr, summary() or a log line.
    api_key: str | None = field(default=None, repr=False)
    # StorageConfig may hold credentials: it never appears in this object's repr.
    storage: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        storage_from_env: Callable[[Mapping[str, str]], Any] | None = None,
    ) -> WorkerConfig:
        """Validate every variable and build the config; raise ConfigError naming the first bad one.

        `storage_from_env` replaces `storage.config.StorageConfig.from_env` (tests of the server side only).
        """
        read = EnvReader(env, ConfigError)
        model = read.raw("XTTS_MODEL") or "xtts_v2"
        if model not in RELEASED_MODEL_NAMES:
            read.fail("XTTS_MODEL", f"one of {', '.join(RELEASED_MODEL_NAMES)}", model)
        config = cls(
            model_dir=read.raw("XTTS_MODEL_DIR"),
            model=model,
            device=_device(read),
            gpt_dtype=read.choice("XTTS_GPT_DTYPE", "auto", GPT_DTYPES),
            max_concurrency=read.integer("MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY, minimum=1),
            max_batch_size=read.integer("MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE, minimum=1),
            max_batch_tokens=read.integer("MAX_BATCH_TOKENS", 0, minimum=0),
            scheduling=read.choice("SCHEDULING", "continuous", SCHEDULINGS),
            batch_wait_ms=read.number("BATCH_WAIT_MS", 15.0, minimum=0.0),
            latent_cache=read.choice("LATENT_CACHE", "on", ("on", "off")) == "on",
            latent_cache_size=read.integer("LATENT_CACHE_SIZE", 256, minimum=1),
            latent_cache_dir=env.get("LATENT_CACHE_DIR", "/tmp/latent_cache").strip() or None,
            latent_cache_disk_entries=read.integer("LATENT_CACHE_DISK_ENTRIES", 2000, minimum=1),
            vocoder_batching=read.choice("XTTS_VOCODER_BATCHING", "auto", VOCODER_MODES),
            kv_cache=read.choice("XTTS_KV_CACHE", "auto", KV_CACHES),
            cuda_graphs=read.choice("XTTS_CUDA_GRAPHS", "auto", CUDA_GRAPH_MODES),
            engine=read.choice("XTTS_ENGINE", "batched", ENGINES),
            max_text_chars=read.integer("MAX_TEXT_CHARS", 5000, minimum=1),
            job_timeout_s=read.number("JOB_TIMEOUT_S", 600.0, minimum=0.0, exclusive=True),
            metrics_port=read.integer("METRICS_PORT", 9090, minimum=0, maximum=65535),
            metrics_host=read.raw("METRICS_HOST") or "0.0.0.0",
            log_level=_log_level(read),
            default_language=_language(read),
            default_output_format=read.choice("DEFAULT_OUTPUT_FORMAT", "wav", SUPPORTED_OUTPUT_FORMATS),
            ref_min_level_dbfs=_ref_min_level(read),
            vocoder_span_s=read.number("VOCODER_SPAN_S", 8.0, minimum=0.0, maximum=60.0),
            streaming=read.choice("STREAMING", "off", ("on", "off")) == "on",
            stream_first_chunk_s=read.number("STREAM_FIRST_CHUNK_S", 0.5, minimum=0.05, maximum=10.0),
            stream_max_chunk_s=read.number("STREAM_MAX_CHUNK_S", 8.0, minimum=0.05, maximum=10.0),
            stream_buffer_s=read.number("STREAM_BUFFER_S", 60.0, minimum=1.0, maximum=3600.0),
            stream_aggregate=read.choice("STREAM_AGGREGATE", "on", ("on", "off")) == "on",
            server_mode=read.choice("SERVER_MODE", "queue", SERVER_MODES),
        )
        if config.server_mode == "http":  # read only where they mean something: a queue worker ignores them
            config = _with_http_settings(config, read)
        _check_cuda_graphs(config, read)
        if config.stream_max_chunk_s < config.stream_first_chunk_s:
            read.fail("STREAM_MAX_CHUNK_S", f"at least STREAM_FIRST_CHUNK_S ({config.stream_first_chunk_s:g})",
                      str(config.stream_max_chunk_s))  # fmt: skip
        storage = (storage_from_env or _storage_from_env)(env)
        return replace(config, storage=storage)

    def advisories(self) -> list[str]:
        """Settings that are valid but probably not what the operator wants; the worker logs them at start."""
        notes = []
        if self.engine == "stock":
            notes.append("XTTS_ENGINE=stock decodes one row at a time the way stock Xtts.inference does: a benchmark "
                         "baseline, several times slower than the batched engine")
        if self.engine == "stock" and self.scheduling == "continuous":
            notes.append("XTTS_ENGINE=stock decodes whole rows: it runs with SCHEDULING=static")
        if self.streaming and self.scheduling == "static":
            notes.append("STREAMING=on with SCHEDULING=static: audio streams only as whole segments finish")
        if self.server_mode == "http" and self.streaming:
            notes.append("STREAMING=on has no effect with SERVER_MODE=http: each HTTP request chooses whether it "
                         "streams (its response_format and stream_format)")
        if self.server_mode == "queue" and self.streaming and self.stream_aggregate:
            notes.append("STREAMING=on with STREAM_AGGREGATE=on: each job-done POST carries the whole stream again "
                         "(about 64 KB per second of audio, so RunPod's 10 MB /run cap is reached near 150 s); "
                         "callers that read /stream only can set STREAM_AGGREGATE=off")  # fmt: skip
        if self.server_mode == "http" and self.api_key is None:
            notes.append("SERVER_MODE=http without API_KEY: anyone who reaches the port can use the API")
        if self.server_mode == "queue" and self.max_concurrency < 2 * self.max_batch_size:
            notes.append(
                f"MAX_CONCURRENCY={self.max_concurrency} is less than twice MAX_BATCH_SIZE={self.max_batch_size}: "
                "the RunPod SDK pauses 1 s whenever every slot is busy, so the GPU will idle between batches"
            )
        return notes

    def summary(self) -> dict[str, Any]:
        """The server-side settings as a dict for the start-up log (no storage settings, so no secrets)."""
        return {
            "model_dir": self.model_dir,
            "model": self.model,
            "device": self.device,
            "gpt_dtype": self.gpt_dtype,
            "max_concurrency": self.max_concurrency,
            "max_batch_size": self.max_batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "scheduling": self.scheduling,
            "batch_wait_ms": self.batch_wait_ms,
            "latent_cache": self.latent_cache,
            "latent_cache_size": self.latent_cache_size,
            "latent_cache_dir": self.latent_cache_dir,
            "vocoder_batching": self.vocoder_batching,
            "engine": self.engine,
            "max_text_chars": self.max_text_chars,
            "job_timeout_s": self.job_timeout_s,
            "metrics_port": self.metrics_port,
            "metrics_host": self.metrics_host,
            "log_level": self.log_level,
            "default_language": self.default_language,
            "default_output_format": self.default_output_format,
            "ref_min_level_dbfs": self.ref_min_level_dbfs,
            "vocoder_span_s": self.vocoder_span_s,
            "streaming": self.streaming,
            "stream_first_chunk_s": self.stream_first_chunk_s,
            "stream_max_chunk_s": self.stream_max_chunk_s,
            "stream_buffer_s": self.stream_buffer_s,
            "stream_aggregate": self.stream_aggregate,
            "server_mode": self.server_mode,
            **(self._http_summary() if self.server_mode == "http" else {}),
        }

    def _http_summary(self) -> dict[str, Any]:
        # Whether a key is required, never the key.
        return {
            "host": self.host,
            "port": self.port,
            "port_health": self.port_health,
            "voice_ref_url_template": self.voice_ref_url_template,
            "api_key_required": self.api_key is not None,
            "http_ref_audio_url": self.http_ref_audio_url,
            "http_write_timeout_s": self.http_write_timeout_s,
            "http_read_timeout_s": self.http_read_timeout_s,
            "http_keepalive_s": self.http_keepalive_s,
            "http_max_connections": self.http_max_connections,
        }

