"""A loopback stand-in for RunPod's serverless job service, speaking the protocol the runpod SDK (1.12) uses.

Tests and load benchmarks run the REAL SDK loop (`runpod.serverless.start` -> JobScaler, with real concurrency)
against it. What the SDK does, read from its source (runpod/serverless/modules/rp_job.py, rp_http.py, rp_scale.py,
rp_ping.py, worker_state.py):

- Job take. JobScaler asks for `concurrency - jobs held` jobs. For one it GETs RUNPOD_WEBHOOK_GET_JOB with `$ID`
  replaced by the worker id (RUNPOD_POD_ID) and `&job_in_progress=0|1` appended; for more it swaps `/job-take/`
  for `/job-take-batch/` and appends `&batch_size=N&job_in_progress=0|1` (so the variable must already hold a
  `?query`). The service holds the request open (long-poll) and answers 204 when nothing came, a JSON object
  `{"id", "input"}` (job-take) or a JSON list of them (job-take-batch); 400 is read as "nothing" too, 429 makes
  the SDK wait 5 s. When every slot is busy the SDK sleeps 1 s before asking again.
- Job done. The result is POSTed to RUNPOD_WEBHOOK_POST_OUTPUT with `$RUNPOD_POD_ID` and `$ID` (the job id)
  replaced and `&isStream=false|true` appended; the body is JSON text (sent as x-www-form-urlencoded):
  `{"output": ...}`, or `{"error": "...", "output": {...}}` for a failed job; `{"status": "IN_PROGRESS",
  "output": ...}` is a progress update (runpod.serverless.progress_update). The SDK retries a POST that gets a
  5xx (aiohttp_retry FibonacciRetry: 3 attempts in all, 2 s then 3 s apart); a 4xx or a connection error is not
  retried, and after the last failure the result is dropped with only a log line.
- Job stream: generator handlers POST each chunk to RUNPOD_WEBHOOK_POST_STREAM the same way.
- Ping: a separate process GETs RUNPOD_WEBHOOK_PING (`$RUNPOD_POD_ID` replaced) every RUNPOD_PING_INTERVAL ms
  with `job_id=<ids in progress, comma separated>&runpod_version=...`, only when RUNPOD_AI_API_KEY and
  RUNPOD_POD_ID are set.
- Stop (cancel/timeout): the SDK long-polls the job-take URL with `/job-take/` replaced by `/job-stop/`; the
  service answers 204, or `{"jobsToStop": ["id", ...]}`; the SDK then cancels that job's asyncio task (the
  handler sees CancelledError) and posts NO result. It sleeps 1 s after each empty answer.
- Every request carries `Authorization: <RUNPOD_AI_API_KEY>`.

Use it from a test (one event loop; call the methods from that loop):

    async with FakeRunPod() as fake:
        env = fake.env()                       # the variables a worker process needs
        job_id = fake.enqueue({"gen_text": "..."})
        ...start a worker with env...
        jobs = await fake.wait_done([job_id], timeout_s=60)

Or from the command line (prints the environment, or runs a worker command against it):

    python -m testing.runpod_fake --jobs 40 --input test_input.json -- python -m server
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from testing.loopback import LoopbackApp

# Job states, as RunPod names them.
QUEUED = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TERMINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass
class FakeJob:
    id: str
    input: Any
    state: str = QUEUED
    result: dict | None = None  # the final body the worker POSTed (COMPLETED / FAILED)
    progress: list[Any] = field(default_factory=list)  # IN_PROGRESS updates
    stream: list[dict] = field(default_factory=list)  # job-stream posts, in order
    stream_at: list[float] = field(default_factory=list)  # when each job-stream post arrived (the service's clock)
    result_posts: int = 0  # job-done POSTs received, including refused ones (failure injection)
    late_results: list[dict] = field(default_factory=list)  # results that arrived after a cancel
    stop_sent: bool = False  # a stop signal for it was delivered on the job-stop channel
    enqueued_at: float = 0.0
    taken_at: float | None = None
    done_at: float | None = None

    @property
    def output(self) -> Any:
        return None if self.result is None else self.result.get("output")


@dataclass(frozen=True)
class TakeRequest:
    path: str  # job-take or job-take-batch
    worker_id: str
    batch_size: int
    job_in_progress: str | None
    jobs_given: int


@dataclass(frozen=True)
class Ping:
    worker_id: str
    job_ids: tuple[str, ...]
    runpod_version: str | None
    at: float


@dataclass
class _PostFailure:
    remaining: int
    status: int
    job_id: str | None


class FakeRunPod:
    """The fake service. Not thread-safe: call its methods from the event loop it runs on."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_id: str = "fake-endpoint",
        worker_id: str = "fake-worker",
        api_key: str = "fake-api-key",
        poll_timeout_s: float = 1.0,
        stop_poll_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.host = host
        self.port = port
        self.endpoint_id = endpoint_id
        self.worker_id = worker_id
        self.api_key = api_key
        self.poll_timeout_s = poll_timeout_s
        self.stop_poll_timeout_s = stop_poll_timeout_s
        self._clock = clock
        self.jobs: dict[str, FakeJob] = {}
        self.take_requests: list[TakeRequest] = []
        self.pings: list[Ping] = []
        self.unknown_posts: list[tuple[str, str]] = []  # (path, body) for posts naming no known job
        self.auth_failures = 0
        self.max_in_progress = 0
        self._queue: collections.deque[str] = collections.deque()
        self._stops: list[str] = []
        self._post_failures: list[_PostFailure] = []
        self._changed = asyncio.Event()
        self._server: LoopbackApp | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> FakeRunPod:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        prefix = f"/v2/{self.endpoint_id}"
        app.router.add_get(prefix + "/job-take/{worker}", self._job_take)
        app.router.add_get(prefix + "/job-take-batch/{worker}", self._job_take)
        app.router.add_get(prefix + "/job-stop/{worker}", self._job_stop)
        app.router.add_post(prefix + "/job-done/{worker}/{job_id}", self._job_done)
        app.router.add_post(prefix + "/job-stream/{worker}/{job_id}", self._job_stream)
        app.router.add_get(prefix + "/ping/{worker}", self._ping)
        self._server = await LoopbackApp(app, host=self.host, port=self.port, access_log=None,
                                         handle_signals=False, shutdown_timeout=0.5).start()  # fmt: skip
        self.port = self._server.port
        return self

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def __aenter__(self) -> FakeRunPod:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, *, ping_interval_ms: int = 1000) -> dict[str, str]:
        """The variables a worker process needs to run the SDK's production loop against this service.

        RUNPOD_WEBHOOK_GET_JOB is what makes the SDK take the production path (JobScaler); the system and GPU
        fitness checks are skipped because the loopback worker has neither the disk nor the GPU they expect.
        """
        if ping_interval_ms < 1000:
            # The SDK computes int(ms) // 1000 seconds: anything below 1000 would ping in a tight loop.
            raise ValueError(f"ping_interval_ms must be >= 1000, got {ping_interval_ms}")
        base = f"{self.base_url}/v2/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=fake",
            "RUNPOD_POD_ID": self.worker_id,
            "RUNPOD_POD_HOSTNAME": f"{self.worker_id}-host",
            "RUNPOD_AI_API_KEY": self.api_key,
            "RUNPOD_PING_INTERVAL": str(ping_interval_ms),
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # ------------------------------------------------------------------ driving it

    def enqueue(self, job_input: Any, job_id: str | None = None) -> str:
        """Queue one job; returns its id."""
        self._counter += 1
        job_id = job_id or f"job-{self._counter:05d}-{uuid.uuid4().hex[:8]}"
        if job_id in self.jobs:
            raise ValueError(f"job id {job_id!r} is already used")
        self.jobs[job_id] = FakeJob(id=job_id, input=job_input, enqueued_at=self._clock())
        self._queue.append(job_id)
        self._notify()
        return job_id

    def enqueue_many(self, inputs: Iterable[Any]) -> list[str]:
        return [self.enqueue(job_input) for job_input in inputs]

    def cancel(self, job_id: str) -> str:
        """Cancel a job as RunPod's /cancel does. Returns what happened:

        `dequeued`  it had not been taken: it leaves the queue and is never handed out;
        `stopping`  a worker holds it: the id goes out on the job-stop channel, and the job is CANCELLED now
                    (a result the worker posts later is kept in `late_results`, not as the result);
        `finished`  it had already finished: nothing changes.
        """
        job = self.jobs[job_id]
        if job.state == QUEUED:
            self._queue.remove(job_id)
            self._finish(job, CANCELLED)
            return "dequeued"
        if job.state == IN_PROGRESS:
            self._stops.append(job_id)
            self._finish(job, CANCELLED)
            return "stopping"
        return "finished"

    def fail_result_posts(self, count: int, *, status: int = 500, job_id: str | None = None) -> None:
        """Refuse the next `count` job-done POSTs (for `job_id` only, when given) with HTTP `status`."""
        if count < 1 or not 400 <= status <= 599:
            raise ValueError(f"need count >= 1 and a 4xx/5xx status, got count={count}, status={status}")
        self._post_failures.append(_PostFailure(count, status, job_id))

    def in_progress(self) -> list[str]:
        return [job.id for job in self.jobs.values() if job.state == IN_PROGRESS]

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds (re-checked at each change of state); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    async def wait_done(self, job_ids: Sequence[str], timeout_s: float) -> dict[str, FakeJob]:
        """Wait until every job is COMPLETED, FAILED or CANCELLED; raise TimeoutError naming the ones left."""
        done = await self.wait_until(lambda: all(self.jobs[i].state in TERMINAL_STATES for i in job_ids), timeout_s)
        if not done:
            left = [i for i in job_ids if self.jobs[i].state not in TERMINAL_STATES]
            states = collections.Counter(self.jobs[i].state for i in left)
            raise TimeoutError(f"{len(left)} of {len(job_ids)} jobs unfinished after {timeout_s} s: {dict(states)}")
        return {i: self.jobs[i] for i in job_ids}

    # ------------------------------------------------------------------ internals

    def _notify(self) -> None:
        # Wake every waiter; each re-checks its own condition. A fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _finish(self, job: FakeJob, state: str) -> None:
        job.state = state
        job.done_at = self._clock()
        self._notify()

    def _authorized(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") == self.api_key:
            return True
        self.auth_failures += 1
        return False

    async def _job_take(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        batch = "/job-take-batch/" in request.path
        try:
            batch_size = int(request.query.get("batch_size", "1")) if batch else 1
        except ValueError:
            return web.Response(status=400, text="batch_size must be an integer")
        await self.wait_until(lambda: bool(self._queue), self.poll_timeout_s)
        given = []
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=204)  # the worker hung up while waiting: hand it nothing
        while self._queue and len(given) < max(1, batch_size):
            job = self.jobs[self._queue.popleft()]
            job.state = IN_PROGRESS
            job.taken_at = self._clock()
            given.append(job)
        self.take_requests.append(
            TakeRequest(
                path="job-take-batch" if batch else "job-take",
                worker_id=request.match_info["worker"],
                batch_size=batch_size,
                job_in_progress=request.query.get("job_in_progress"),
                jobs_given=len(given),
            )
        )
        if not given:
            return web.Response(status=204)
        self.max_in_progress = max(self.max_in_progress, len(self.in_progress()))
        self._notify()
        bodies = [{"id": job.id, "input": job.input} for job in given]
        return web.json_response(bodies if batch else bodies[0])

    async def _job_stop(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        await self.wait_until(lambda: bool(self._stops), self.stop_poll_timeout_s)
        if not self._stops:
            return web.Response(status=204)
        stops, self._stops = self._stops, []
        for job_id in stops:
            self.jobs[job_id].stop_sent = True
        self._notify()
        return web.json_response({"jobsToStop": stops})

    def _injected_failure(self, job_id: str) -> int | None:
        for failure in self._post_failures:
            if failure.job_id in (None, job_id):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._post_failures.remove(failure)
                return failure.status
        return None

    async def _job_done(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        job_id = request.match_info["job_id"]
        text = await request.text()
        job = self.jobs.get(job_id)
        if job is None:
            self.unknown_posts.append((request.path, text))
            return web.Response(status=404, text=f"no job {job_id}")
        job.result_posts += 1
        self._notify()
        status = self._injected_failure(job_id)
        if status is not None:
            return web.Response(status=status, text="injected failure")
        try:
            body = json.loads(text)
        except ValueError:
            return web.Response(status=400, text="body is not JSON")
        if not isinstance(body, dict):
            return web.Response(status=400, text="body is not a JSON object")
        if body.get("status") == IN_PROGRESS:
            job.progress.append(body.get("output"))
        elif job.state == IN_PROGRESS:
            job.result = body
            self._finish(job, FAILED if body.get("error") else COMPLETED)
        else:
            job.late_results.append(body)
        self._notify()
        return web.json_response({"ok": True})

    async def _job_stream(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        job = self.jobs.get(request.match_info["job_id"])
        text = await request.text()
        if job is None:
            self.unknown_posts.append((request.path, text))
            return web.Response(status=404)
        try:
            job.stream.append(json.loads(text))
        except ValueError:
            return web.Response(status=400, text="body is not JSON")
        job.stream_at.append(self._clock())
        self._notify()
        return web.json_response({"ok": True})

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        ids = request.query.get("job_id") or ""
        self.pings.append(
            Ping(
                worker_id=request.match_info["worker"],
                job_ids=tuple(i for i in ids.split(",") if i),
                runpod_version=request.query.get("runpod_version"),
                at=self._clock(),
            )
        )
        self._notify()
        return web.Response(status=200)


class WorkerProcess:
    """A worker command run against a FakeRunPod, its output in a log file; stop() sends SIGTERM like RunPod."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: str | os.PathLike, cwd: str | None = None
    ):
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> WorkerProcess:
        with open(self.log_path, "wb") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stop reaches the SDK's ping child too
            )  # fmt: skip
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait up to timeout_s, then SIGKILL the group. Returns the exit status (negative: a signal)."""
        process = self.process
        if process is None:
            raise RuntimeError("the worker was never started")
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        # Leave no orphan behind (the SDK's heartbeat process is a daemon child of the worker).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return process.returncode


def summarize(jobs: Iterable[FakeJob], wall_s: float) -> dict[str, Any]:
    """Counts by state, throughput and latency statistics (enqueue to result) of finished jobs."""
    from bench.stats import summarize as summarize_values  # the benchmark's percentiles; only this summary uses them

    jobs = list(jobs)
    latencies = [j.done_at - j.enqueued_at for j in jobs if j.done_at is not None and j.state != CANCELLED]
    completed = sum(1 for j in jobs if j.state == COMPLETED)
    return {
        "jobs": len(jobs),
        "states": dict(collections.Counter(j.state for j in jobs)),
        "wall_s": round(wall_s, 4),
        "jobs_per_s": round(completed / wall_s, 4) if wall_s > 0 else None,
        "latency_s": summarize_values(latencies),
        "errors": [j.result.get("error") for j in jobs if j.state == FAILED and j.result][:10],
    }


def _load_inputs(path: str | None, count: int) -> list[Any]:
    if path is None:
        payload: Any = {"input": {}}
    else:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    job_input = payload["input"] if isinstance(payload, dict) and "input" in payload else payload
    return [job_input for _ in range(count)]


async def _main(args: argparse.Namespace) -> int:
    async with FakeRunPod(port=args.port, poll_timeout_s=args.poll_timeout_s) as fake:
        env = fake.env()
        for name, value in env.items():
            print(f"export {name}='{value}'", file=sys.stderr)
        worker = None
        if args.command:
            log_path = args.worker_log or "runpod_fake_worker.log"
            worker = await WorkerProcess(args.command, {**os.environ, **env}, log_path).start()
            print(f"worker pid {worker.process.pid}, log in {log_path}", file=sys.stderr)
        started = time.monotonic()
        job_ids = fake.enqueue_many(_load_inputs(args.input, args.jobs))
        try:
            await fake.wait_done(job_ids, args.timeout_s)
            status = 0
        except TimeoutError as exc:
            print(str(exc), file=sys.stderr)
            status = 1
        summary = summarize(fake.jobs.values(), time.monotonic() - started)
        summary["max_in_progress"] = fake.max_in_progress
        if worker is not None:
            summary["worker_exit_status"] = await worker.stop()
        print(json.dumps(summary, indent=2))
        return status if summary["states"].get(COMPLETED, 0) == len(job_ids) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testing.runpod_fake",
        description="Serve RunPod's job protocol on 127.0.0.1, queue jobs, wait for their results, print a summary.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--jobs", type=int, default=1, help="how many copies of the input to queue (default 1)")
    parser.add_argument("--input", help="JSON file with {'input': {...}} such as test_input.json")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait for all results")
    parser.add_argument("--poll-timeout-s", type=float, default=1.0, help="long-poll hold time of job-take")
    parser.add_argument("--worker-log", help="where the worker command's output goes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- a worker command to run with the env")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
