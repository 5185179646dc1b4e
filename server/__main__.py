"""`python -m server`: start the worker.

    config (once, from the environment) -> logging -> metrics endpoint -> storage check -> engine loaded and
    warmed up -> runpod.serverless.start(async handler, concurrency_modifier)

SERVER_MODE=http (server.http_server): config -> logging -> metrics endpoint -> HTTP listeners (GET /ping: 204)
-> storage check -> engine loaded and warmed up (in a thread) -> handler context built in the server's own
uvloop event loop -> /ping 200; SIGTERM drains the requests in flight, then the process exits 0.

Everything that can fail at start fails here, before a job is taken, with a message that names the cause
(a bad variable, "GCS not configured correctly: ...", "XTTS V2 model is not loaded: ...", a port that cannot be
listened on), and exit code 2.
RunPod's own flags pass through to the SDK: `--rp_serve_api` (local test API), `--test_input '{...}'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

log = logging.getLogger("server")

EXIT_CONFIG = 2
EXIT_FATAL_ENGINE = 70  # the GPU is unusable: RunPod replaces the worker
# After a fatal engine error the scheduler has failed every job in hand (retryable); this long is left for the SDK
# to post those answers before the process exits, so that no accepted job is left without one.
FATAL_EXIT_GRACE_S = 3.0
_background: set[asyncio.Task] = set()  # tasks that must not be garbage-collected while the loop runs


def _setup_logging(level: str) -> None:
    from server.logtext import EscapingFormatter

    logging.basicConfig(level=level, stream=sys.stdout, force=True)
    # Caller text in a message (gen_text, a URL) is shown escaped: no terminal escapes, no forged lines.
    logging.getLogger().handlers[0].setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The SDK logs every job's input and output at DEBUG (signed URLs included): keep it at INFO or above.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO" if level == "DEBUG" else level)


def _prepare_sdk_environment() -> None:
    """Offline-friendly SDK defaults; RunPod's platform sets the variables that matter in production."""
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    os.environ.setdefault("RUNPOD_SKIP_GPU_CHECK", "true")


def load_engine(config):
    """Load the model and warm it up (first conditioning and one short batch), so the first job is not slow."""
    from batching import XttsEngine
    from batching.engine import SamplingParams, Segment
    from batching.demo import synthetic_voice
    from batching.stock import StockEngine

    started = time.perf_counter()
    engine_class = StockEngine if config.engine == "stock" else XttsEngine
    engine = engine_class.load(
        config.model_dir, model=config.model, device=config.device,
        gpt_dtype=config.gpt_dtype, vocoder=config.vocoder_batching, kv_cache=config.kv_cache,
        cuda_graphs=config.cuda_graphs,
    )  # fmt: skip
    voice = engine.condition(synthetic_voice(2.0, sr=engine.input_sample_rate), engine.input_sample_rate)
    tokens = engine.tokenize("Warm up.", "en")
    engine.generate([Segment(tokens, 8, voice, SamplingParams(seed=0))] * min(2, config.max_batch_size))
    log.info("%s engine ready on %s in %.1f s (%s; KV cache %s, CUDA graphs %s)", config.engine, engine.device,
             time.perf_counter() - started, "DEMO checkpoint, random weights" if engine.demo else "XTTS-v2",
             getattr(engine, "kv_cache", config.kv_cache),
             "on" if getattr(engine, "graphs", None) else "off")  # fmt: skip
    return engine


async def check_storage(storage_config) -> None:
    from storage import open_storage

    storage = await open_storage(storage_config)
    await storage.close()


def make_scheduler(config, engine, metrics):
    """The GPU side on the worker's settings (not started)."""
    from batching import LatentCache, Scheduler, model_fingerprint
    from batching.scheduler import StreamSettings
    from server.metrics import SchedulerMetrics

    model_id = model_fingerprint(config.model_dir) if config.model_dir else config.model
    latents = LatentCache(config.latent_cache_size, config.latent_cache_dir, model_id,
                          disk_max_entries=config.latent_cache_disk_entries,
                          enabled=config.latent_cache)  # fmt: skip
    return Scheduler(
        engine, latents,
        max_batch_size=config.max_batch_size, batch_wait_s=config.batch_wait_ms / 1000,
        observer=SchedulerMetrics(metrics) if metrics else None, on_fatal=_exit_on_fatal,
        scheduling=config.scheduling, max_batch_tokens=config.max_batch_tokens,
        stream_settings=StreamSettings(config.stream_first_chunk_s, config.stream_max_chunk_s,
                                       config.stream_buffer_s),
        vocoder_span_s=config.vocoder_span_s or None,
    )  # fmt: skip


def _close_at_loop_end(*closables) -> None:
    """The SDK ends its loop with asyncio.run's clean-up, which cancels the tasks left: close what the worker
    opened then (in this order), so that shutdown leaves no unclosed session behind."""

    async def wait_then_close():
        try:
            await asyncio.Event().wait()
        finally:
            for closable in closables:
                await closable.close()

    _background.add(asyncio.get_running_loop().create_task(wait_then_close(), name="close-at-loop-end"))


def make_context_builder(config, engine, metrics):
    """The handler context is built inside the SDK's event loop, on the first job (see server.handler)."""

    async def build():
        from server.context import HandlerContext
        from server.metrics import StorageMetrics
        from storage import ReferenceCache, open_storage

        storage_config = config.storage
        storage = await open_storage(storage_config)
        if metrics:
            storage.observer = StorageMetrics(metrics)
        references = ReferenceCache(storage_config.cache_dir, storage_config.cache_max_bytes, storage,
                                    max_ref_bytes=storage_config.max_ref_bytes)  # fmt: skip
        scheduler = make_scheduler(config, engine, metrics)
        await scheduler.start()
        _close_at_loop_end(scheduler, references, storage)
        progress = None
        if os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):  # RunPod's production loop: it has a progress channel
            import runpod

            progress = runpod.serverless.progress_update
        return HandlerContext(
            config=config, storage=storage, references=references, scheduler=scheduler, metrics=metrics,
            reference_sample_rate=engine.input_sample_rate, max_reference_s=float(engine.max_ref_len),
            progress=progress,
        )  # fmt: skip

    return build


def _is_startup_failure(exc: BaseException) -> bool:
    """A failure at start that is the environment's, not a bug: exit 2 with its message, no traceback."""
    from batching import EngineError
    from server.config import ConfigError

    # EngineError: the model; error_code: storage's configuration and access errors.
    return isinstance(exc, EngineError | ConfigError) or bool(getattr(exc, "error_code", None))


def _serve_http(config, metrics) -> int:
    """SERVER_MODE=http: the OpenAI-compatible server (server.http_server) until SIGTERM; its exit code."""
    import dataclasses

    import uvloop

    from server.http_server import StartupError, serve

    async def start():
        try:
            await check_storage(config.storage)
            engine = await asyncio.to_thread(load_engine, config)
        except Exception as exc:
            if _is_startup_failure(exc):
                raise StartupError(str(exc)) from exc
            raise
        metrics.set_engine(config.engine, str(engine.device), "batched" if engine.vocoder_batched else "per_row")
        metrics.update_gpu_memory()
        context = await make_context_builder(config, engine, metrics)()
        return dataclasses.replace(context, progress=None)  # RunPod's progress channel is for queue jobs

    try:
        uvloop.run(serve(config, start, metrics=metrics))
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    return 0


def _raise_open_files_limit() -> None:
    """RLIMIT_NOFILE's soft limit up to its hard one: every HTTP connection is a file descriptor (the default soft
    limit of 1,024 is less than HTTP_MAX_CONNECTIONS leaves room for; server.http_server fits the cap to it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            return
        log.info("open-files limit raised from %d to %d", soft, target)


def _exit_on_fatal(error: BaseException) -> None:
    log.critical("fatal engine error: %s; answering the jobs in hand, then exiting (code %d) in %.0f s so that "
                 "RunPod replaces this worker", error, EXIT_FATAL_ENGINE, FATAL_EXIT_GRACE_S)  # fmt: skip
    # A timer thread, not the event loop: it fires even if the loop or the engine thread is stuck in the driver.
    timer = threading.Timer(FATAL_EXIT_GRACE_S, _hard_exit)
    timer.daemon = True
    timer.start()


def _hard_exit() -> None:
    logging.shutdown()
    os._exit(EXIT_FATAL_ENGINE)


def main(argv: list[str] | None = None) -> int:
    from server.config import WorkerConfig

    try:
        config = WorkerConfig.from_env(os.environ)
    except Exception as exc:  # ConfigError, or storage's "GCS not configured correctly: ..."
        logging.basicConfig(level="INFO", stream=sys.stderr)
        log.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    _setup_logging(config.log_level)
    for note in config.advisories():
        log.warning("%s", note)
    log.info("configuration: %s", config.summary())
    metrics = _start_metrics(config)
    if metrics is None:
        return EXIT_CONFIG
    if config.server_mode == "http":
        _raise_open_files_limit()
        if ignored := (sys.argv[1:] if argv is None else argv):
            log.warning("arguments ignored with SERVER_MODE=http (they are RunPod SDK flags): %s", " ".join(ignored))
        return _serve_http(config, metrics)
    return _serve_queue(config, metrics, argv)


def _start_metrics(config):
    """The worker's metrics, served on METRICS_PORT (0: not served); None when the port cannot be bound."""
    from prometheus_client import CollectorRegistry

    from server.metrics import Metrics, start_metrics_server

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    if config.metrics_port:
        try:
            start_metrics_server(config.metrics_port, registry, config.metrics_host)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", config.metrics_host, config.metrics_port,
                      exc.strerror or exc)  # fmt: skip
            return None
    return metrics


def _serve_queue(config, metrics, argv: list[str] | None) -> int:
    """SERVER_MODE=queue: RunPod's job loop (runpod.serverless.start) with the model loaded and warm first."""
    import uvloop

    from server.handler import make_concurrency_modifier, make_handler

    try:
        asyncio.run(check_storage(config.storage))
        engine = load_engine(config)
    except Exception as exc:
        if not _is_startup_failure(exc):
            raise
        log.error("%s", exc)
        return EXIT_CONFIG
    metrics.set_engine(config.engine, str(engine.device), "batched" if engine.vocoder_batched else "per_row")
    metrics.update_gpu_memory()

    _prepare_sdk_environment()
    uvloop.install()
    import runpod  # after the environment is set: the SDK reads it at import

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    settings = {
        "handler": make_handler(make_context_builder(config, engine, metrics), streaming=config.streaming),
        "concurrency_modifier": make_concurrency_modifier(config.max_concurrency),
    }
    if config.streaming:
        # STREAM_AGGREGATE=on: /run + /stream, and /runsync and /status answer with every item, then the result;
        # off: the items reach /stream only, and the SDK posts the job done with an empty output list.
        settings["return_aggregate_stream"] = config.stream_aggregate
    runpod.serverless.start(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
