"""`python -m bench`: load-test the XTTS worker, the seed's behaviour (baseline) beside batching, in ONE run.

    python -m bench [local]  [--size tiny|small|full] [--device cpu|cuda] [--concurrencies 1,4,16] [--jobs 16] ...
    python -m bench endpoint --endpoint-id ID [--base-url https://api.runpod.ai/v2] [--mode run|runsync] ...
    python -m bench http [--http-url URL] [--concurrencies 1,16] ...   (OpenAI speech API, SERVER_MODE=http)
    python -m bench engine [--size small] [--requests 16] ...     (the engine benchmark: bench/engine_bench.py)

`local` (the default) starts everything on 127.0.0.1 (bench/stack.py): fake-gcs-server (behind a latency/fault
proxy when asked), a RunPod job service (testing.runpod_fake.FakeRunPod) and, for each configuration, one worker
process (`python -m server`, RunPod production mode, a demo checkpoint of the chosen size); it stops all of it at
the end, on Ctrl-C too. `endpoint` drives a deployed RunPod endpoint (API key from RUNPOD_API_KEY) or the SDK's
local test API (`python -m server --rp_serve_api`, give its URL as --base-url).

Where each part lives: the flags in bench/cli.py; a run in bench/runs.py (configurations: bench/configs.py; jobs
and load points: bench/workload.py; offering and measuring them: bench/load.py and bench/summary.py; the local
stack: bench/stack.py; endpoints and what is watched: bench/targets.py); the report in bench/report.py and
bench/notes.py. Results: bench/results/<name>.json, <name>.md and <name>.png. Run with --help for every flag.
Exit status: 0; 1 when a job failed without injected faults or a run could not complete; 2 on bad arguments or an
unusable setup (e.g. --device cuda without CUDA); 130 on Ctrl-C (partial report written).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.cli import build_parser, is_local, validate

if TYPE_CHECKING:
    from bench.runs import Bench

log = logging.getLogger("bench")


async def _amain(bench: Bench) -> int:
    from bench.report import RESULTS, markdown, write_report
    from bench.stack import BenchError
    from bench.targets import EndpointError

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(OSError):
        bench.extra["load_at_start"] = [round(x, 2) for x in os.getloadavg()]
    a = bench.args
    out_dir = Path(a.out_dir) if a.out_dir else RESULTS
    status = 0
    try:
        if is_local(a):
            await bench.run_local()
        else:
            await bench.run_endpoint()
    except asyncio.CancelledError:
        if any(r.points for r in bench.runs):
            paths = write_report(bench.report(interrupted=True), out_dir, bench.report_name())
            print(f"interrupted; partial report: {paths['json']}", file=sys.stderr)
        raise
    except (BenchError, EndpointError) as exc:
        log.error("%s", exc)
        if not any(r.points for r in bench.runs):
            return 2
        status = 1
    report = bench.report()
    paths = write_report(report, out_dir, report["name"])
    print(markdown(report))
    for kind, path in paths.items():
        print(f"written {kind}: {path}")
    if report["errors_total"] and not report["faults_injected"]:
        log.error("%d job(s) failed without injected faults", report["errors_total"])
        status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["engine"]:
        from bench import engine_bench

        return engine_bench.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    from bench.runs import Bench  # after the arguments are checked: a usage error imports nothing more

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    try:
        bench = Bench(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    # Ctrl-C must stop the run even when a parent shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(_amain(bench))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
