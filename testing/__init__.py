"""Test doubles and loopback helpers that the tests and the benchmarks share; never part of the worker.

- `runpod_fake`: RunPod's serverless job protocol on 127.0.0.1 (`FakeRunPod`) and a worker process run against it;
- `gcs_emulator`: fake-gcs-server on a free loopback port (`GcsEmulator`);
- `faultproxy`: a reverse proxy that injects faults and latency (`FaultProxy`);
- `voices`: synthetic reference voices and cached demo checkpoints;
- `stock_reference`: stock `Xtts.inference`, the oracle the engine's output is compared with;
- `handler_world`: the handler tests' world (`world` fixture: local storage with the seed's voice, a reference
  cache, metrics, handlers on a given scheduler), `ScriptedScheduler`, `seed_input`, the seed's output keys;
- `worker_config`: WorkerConfig from a test's environment with a stand-in storage config (`build`);
- `loopback`: free ports, an aiohttp app on 127.0.0.1 (`LoopbackApp`), a server process waited on until its URL
  answers (`ServerProcess`, `wait_for_http`).

The Docker image does not carry this package, and nothing under server/, batching/ or storage/ imports it.
"""
