"""A tiny RunPod worker with no model: the REAL SDK loop (runpod.serverless.start, production path) with a trivial
handler, for the loopback protocol tests. Run as a script with the env from FakeRunPod.env() plus:

    FAKE_WORKER_CONCURRENCY   what concurrency_modifier returns
    FAKE_WORKER_HANDLER       async (default) | stream (an async generator handler)
    FAKE_WORKER_MARKER_DIR    where the handler drops `<job id>.<event>` files (started, cancelled)

Job inputs steer the async handler: {"mode": "echo" | "fail" | "block" | "progress", "wait_full": bool}.
"""

import asyncio
import os
from pathlib import Path

import runpod  # after the environment is set: the SDK reads its webhook URLs at import

CONCURRENCY = int(os.environ["FAKE_WORKER_CONCURRENCY"])
MARKER_DIR = Path(os.environ["FAKE_WORKER_MARKER_DIR"])

active = 0
peak = 0
all_slots_busy = asyncio.Event()


def mark(job_id: str, event: str) -> None:
    (MARKER_DIR / f"{job_id}.{event}").write_text(str(os.getpid()))


async def handler(job):
    global active, peak
    job_input = job["input"]
    mode = job_input.get("mode", "echo")
    active += 1
    peak = max(peak, active)
    if active >= CONCURRENCY:
        all_slots_busy.set()
    try:
        mark(job["id"], "started")
        if mode == "block":
            await asyncio.Event().wait()  # only a stop (task cancel) ends this
        if mode == "fail":
            return {"error": "failing as asked", "error_code": "test_failure"}
        if mode == "progress":
            runpod.serverless.progress_update(job, {"step": 1})
        if job_input.get("wait_full"):
            # Hold the job until every slot is busy once, so the test sees the SDK's real concurrency. The wait
            # is bounded: if the SDK never fills the slots, the jobs still finish and the peak tells the truth.
            try:
                await asyncio.wait_for(all_slots_busy.wait(), 30)
            except TimeoutError:
                pass
        await asyncio.sleep(0.01)
        return {"echo": job_input, "peak": peak, "pid": os.getpid()}
    except asyncio.CancelledError:
        mark(job["id"], "cancelled")
        raise
    finally:
        active -= 1


async def stream_handler(job):
    for index in range(int(job["input"].get("chunks", 3))):
        await asyncio.sleep(0)
        yield {"chunk": index}


if __name__ == "__main__":
    chosen = stream_handler if os.environ.get("FAKE_WORKER_HANDLER") == "stream" else handler
    runpod.serverless.start(
        {
            "handler": chosen,
            "concurrency_modifier": lambda current: CONCURRENCY,
            "return_aggregate_stream": True,
        }
    )
