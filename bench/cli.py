"""The command line of `python -m bench` (the load benchmark): every flag, its default, and the checks that turn a
bad combination into a usage error (exit status 2) before anything starts."""

from __future__ import annotations

import argparse

from bench.configs import CONFIG_NAMES
from bench.workload import PROFILES, split_gs_url

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
DEFAULT_REF_TEMPLATE = "gs://bench/voices/voice-{voice:03d}.wav"


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return values


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load benchmark of the XTTS worker: baseline (the seed's one-job-at-a-time behaviour) beside "
        "the batched worker, measured in one run, reported as JSON, Markdown and PNG in bench/results/. "
        "`python -m bench engine --help`: the engine benchmark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("target", nargs="?", default="local", choices=["local", "endpoint", "http"],
                   help="local: start emulator, fake RunPod and worker processes here; endpoint: a RunPod "
                   "endpoint over HTTP; http: OpenAI speech requests to a worker in HTTP mode, here beside the "
                   "queue mode (--configs streaming,http), or at --http-url")  # fmt: skip
    g = p.add_argument_group("workload (the same for every configuration)")
    g.add_argument("--concurrencies", type=_int_list, default="1,4,16",
                   help="closed-loop points: clients each keeping one job outstanding ('' for none)")
    g.add_argument("--rates", type=_float_list, default="",
                   help="open-loop points: Poisson arrival rates in jobs/s, e.g. 0.5,1 (default: none)")
    g.add_argument("--jobs", type=int, default=12,
                   help="jobs per load point (a closed-loop point gets at least its concurrency)")
    g.add_argument("--voices", type=int, default=8, help="distinct reference voices")
    g.add_argument("--zipf", type=float, default=1.1, help="voice popularity skew: P(k) ~ 1/k^s (0: uniform)")
    g.add_argument("--texts", default="short", choices=sorted(PROFILES),
                   help="text length profile: weights of short replies, sentences and paragraphs")
    g.add_argument("--max-chars", type=int, default=120, help="longest text (paragraphs are cut to it)")
    g.add_argument("--languages", default="pt:0.35,en:0.3,es:0.15,fr:0.08,de:0.07,it:0.05",
                   help="language mix LANG:WEIGHT,... (pt en es fr de it)")
    g.add_argument("--seed", type=int, default=0, help="workload seed: the same seed offers the same jobs")
    g.add_argument("--ref-seconds", type=float, default=6.0, help="length of each synthetic reference voice")
    g.add_argument("--warmup-jobs", type=int, default=2,
                   help="unmeasured jobs (on a voice outside the workload) before the first point of each run")
    g.add_argument("--job-timeout-s", type=float, default=300.0, help="a job without result after this fails")
    g.add_argument("--point-timeout-s", type=float, default=900.0,
                   help="bound of one load point: jobs not offered by then are counted as NOT_STARTED errors")

    g = p.add_argument_group("local target")
    g.add_argument("--size", default="tiny", choices=["tiny", "small", "full"], help="demo checkpoint size")
    g.add_argument("--model-dir", help="a checkpoint folder instead of a demo checkpoint")
    g.add_argument("--device", default="cpu", help="XTTS_DEVICE of the worker: cpu, cuda, cuda:N, auto")
    g.add_argument("--stream", action="store_true",
                   help="local: compare streamed with non-streamed jobs (--configs continuous,streaming: time to "
                        "first audio beside latency); endpoint: read each job's items from /stream/{id} (the "
                        "worker runs STREAMING=on) and record when the first audio item came")  # fmt: skip
    g.add_argument("--configs", default="baseline,batched",
                   help="configurations to run, in order: baseline (the seed: XTTS_ENGINE=stock, "
                   "MAX_CONCURRENCY=1, MAX_BATCH_SIZE=1, BATCH_WAIT_MS=0, LATENT_CACHE=off), unbatched (the "
                   "same settings on this worker's engine) and/or batched")  # fmt: skip
    g.add_argument("--order", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved: every configuration's worker up at once, each load point run on one "
                   "configuration after the other; sequential: one configuration (worker) after the other, "
                   "restarted in between (less memory, e.g. for a full model on a small GPU)")  # fmt: skip
    g.add_argument("--max-concurrency", type=int, default=32, help="batched: MAX_CONCURRENCY")
    g.add_argument("--max-batch-size", type=int, default=8, help="batched: MAX_BATCH_SIZE")
    g.add_argument("--batch-wait-ms", type=float, default=15.0, help="batched: BATCH_WAIT_MS")
    g.add_argument("--worker-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra worker variable for every configuration (repeatable), e.g. "
                   "XTTS_VOCODER_BATCHING=batched")  # fmt: skip
    g.add_argument("--gcs-latency-ms", type=float, default=0.0,
                   help="latency added to every GCS request by the fault proxy")
    g.add_argument("--compare-gcs-latency", type=float, metavar="MS",
                   help="run every configuration twice, without and with MS of added GCS latency, and report "
                   "the throughput ratio")  # fmt: skip
    g.add_argument("--gcs-fail", type=int, default=0,
                   help="fault injection: the first N GCS requests after warm-up get HTTP 503 (the worker retries)")
    g.add_argument("--gcs-resets", type=int, default=0,
                   help="fault injection: the next N GCS requests after warm-up get a connection reset")
    g.add_argument("--worker-start-timeout-s", type=float, default=900.0,
                   help="longest wait for a worker to load the model and serve its warm-up jobs")
    g.add_argument("--keep-work-dir", action="store_true",
                   help="keep the temporary folder (worker logs, caches); kept anyway when a run fails")

    g = p.add_argument_group("endpoint target")
    g.add_argument("--endpoint-id", help="RunPod endpoint id")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="API base; the local test API's URL (http://127.0.0.1:PORT) works too")
    g.add_argument("--baseline-endpoint-id",
                   help="a second endpoint, deployed with the baseline settings, to run the same workload on")
    g.add_argument("--mode", default="run", choices=["run", "runsync"],
                   help="run: POST /run then poll /status; runsync: POST /runsync (polls /status if unfinished)")
    g.add_argument("--api-layout", default="auto", choices=["auto", "runpod", "flat"],
                   help="runpod: {base}/{endpoint_id}/run; flat: {base}/run (the SDK's local test API); auto: "
                   "probe /{endpoint_id}/health, then /openapi.json")  # fmt: skip
    g.add_argument("--status-method", default="auto", choices=["auto", "get", "post"],
                   help="HTTP method of /status (auto: GET on RunPod, POST on the local test API)")
    g.add_argument("--poll-interval-s", type=float, default=0.5, help="/status polling interval")
    g.add_argument("--ref-url-template", default=DEFAULT_REF_TEMPLATE,
                   help="reference URL of voice N ({voice} is formatted); the local target serves these from "
                   "its emulator")  # fmt: skip
    g.add_argument("--local-storage-dir",
                   help="endpoint: write the synthetic voices to DIR/<bucket>/<object> of --ref-url-template "
                   "first (the worker's LOCAL_STORAGE_DIR)")  # fmt: skip
    g.add_argument("--metrics-url", help="endpoint: the worker's Prometheus URL, to scrape around each point")
    g.add_argument("--worker-pid", type=int, help="endpoint: the worker's pid, to sample its RSS")

    g = p.add_argument_group("http target")
    g.add_argument("--http-url",
                   help="a running HTTP-mode worker or RunPod load-balancing endpoint (https://ID.api.runpod.ai; "
                   "API key from RUNPOD_API_KEY); without it, `http` runs locally: --configs streaming,http")

    g = p.add_argument_group("soak (reliability)")
    g.add_argument("--soak-jobs", type=int, default=0,
                   help="after the load points, N more jobs in a closed loop while the worker's RSS is sampled")
    g.add_argument("--soak-concurrency", type=int, help="soak clients (default: the largest concurrency, or 16)")
    g.add_argument("--soak-config", default="batched",
                   help="local: the configuration that soaks (endpoint: always the --endpoint-id one)")
    g.add_argument("--soak-warmup-jobs", type=int,
                   help="RSS 'after warm-up' is taken when this many soak jobs are done (default max(10, N/10))")
    g.add_argument("--soak-timeout-s", type=float, default=7200.0, help="bound of the soak")
    g.add_argument("--rss-interval-s", type=float, default=1.0, help="worker RSS sampling interval")

    g = p.add_argument_group("report")
    g.add_argument("--name", help="report name (default: load-<size>-<device>, or endpoint-<id>)")
    g.add_argument("--out-dir", default=None, help="where the report goes (default bench/results)")
    g.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def is_local(args: argparse.Namespace) -> bool:
    """Does the run start its own stack here (`local`, and `http` without --http-url)?"""
    return args.target == "local" or (args.target == "http" and not args.http_url)


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:

    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not args.concurrencies and not args.rates and not args.soak_jobs:
        parser.error("nothing to run: give --concurrencies, --rates or --soak-jobs")
    if args.target == "http" and args.http_url:
        for flag in ("compare_gcs_latency", "model_dir", "gcs_latency_ms", "gcs_fail", "gcs_resets"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} applies to a local run only")
    elif args.target in ("local", "http"):
        if args.stream:
            args.configs = "continuous,streaming"
        if args.target == "http" and args.configs == "baseline,batched":  # not given: queue mode beside HTTP mode
            args.configs = "streaming,http"
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in CONFIG_NAMES]
        if bad or not configs:
            parser.error(f"--configs takes {', '.join(CONFIG_NAMES)}; got {args.configs!r}")
        args.config_list = configs
        for name in ("max_concurrency", "max_batch_size"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.gcs_latency_ms < 0 or (args.compare_gcs_latency is not None and args.compare_gcs_latency <= 0):
            parser.error("GCS latencies must be >= 0 (--compare-gcs-latency > 0)")
    else:
        if not args.endpoint_id:
            parser.error("the endpoint target needs --endpoint-id")
        for flag in ("compare_gcs_latency", "model_dir"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} applies to the local target only")
        if args.gcs_latency_ms or args.gcs_fail or args.gcs_resets:
            parser.error("GCS fault injection applies to the local target only")
    try:
        args.ref_url_template.format(voice=0)
        if is_local(args):
            split_gs_url(args.ref_url_template.format(voice=0))
    except (KeyError, IndexError, ValueError) as exc:
        parser.error(f"--ref-url-template: {exc}")
