"""The GPU run kit, dry-run on the CPU: `python -m bench.gpu` on the tiny demo model, as the GPU machine would run it.

The dry run runs in a subprocess whose imports are limited to what the GPU machine has (its package list, from the
device tool's notes) plus the wheels scripts/gpu-wheels.sh carries, so a wheel missing from the kit fails here and
not during the one rare GPU lease. It downloads nothing: scripts/gpu-wheels.sh is only linted.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testing.voices import ROOT

WHEELS_SH = ROOT / "scripts" / "gpu-wheels.sh"
CHECK_SH = ROOT / "scripts" / "gpu-check.sh"
SECTIONS = ("equivalence", "first_audio", "load", "step", "half_precision", "vocoder", "throughput", "recommendation")

# The GPU machine's Python packages (nvidia-h200, as read there on 2026-11-17: the device tool's KINDS.md).
GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()
# Stand-ins: what this machine's newer huggingface-hub (2.x) imports where the GPU machine's 1.33 imports httpx
# (there): not a gap of the kit.
STAND_INS = ["httpx2", "httpcore2", "truststore", "backports-zstd", "brotli", "xtts-runpod"]


def carried_wheels() -> list[str]:
    """The distribution names scripts/gpu-wheels.sh downloads (its WHEELS=(...) list of NAME==VERSION)."""
    body = re.search(r"^WHEELS=\(\n(.*?)^\)", WHEELS_SH.read_text(), re.S | re.M)
    assert body, "scripts/gpu-wheels.sh has no WHEELS=( ... ) list"
    return [line.strip().split("==")[0] for line in body.group(1).splitlines() if "==" in line]


# Run as `python -c GUARD ALLOWED ARGS`: hide from the import system (as if not installed: `import` fails,
# `importlib.util.find_spec` says None) every distribution that is neither on the GPU machine nor carried, then run
# `python -m bench.gpu ARGS`.
GUARD = """
import importlib.abc, importlib.machinery, importlib.metadata as md, re, runpy, sys
allowed = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv.pop(1).split(",")}
owners = md.packages_distributions()
hidden = set()
class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, [])}
        if dists and not dists & allowed:
            hidden.add(top)
            return None
        return self.inner.find_spec(name, path, target)
    def invalidate_caches(self):
        self.inner.invalidate_caches()
    def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the same finders
        return self.inner.find_distributions(*args, **kwargs)
sys.meta_path[:] = [Hide(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
    sys.argv[0] = "bench.gpu"
    runpy.run_module("bench.gpu", run_name="__main__", alter_sys=True)
finally:
    print("GUARD hidden:", sorted(hidden), file=sys.stderr)
"""

DRY_RUN = ["--device", "cpu", "--size", "tiny", "--batch-sizes", "1,2", "--vocoder-batch-sizes", "2",
           "--stock-requests", "1", "--min-requests", "2", "--equivalence-texts", "2", "--half-rows", "2",
           "--voices", "1", "--ref-seconds", "2", "--short", "--demo-tokens-per-char", "0.25",
           "--first-audio-reps", "1", "--load-concurrency", "2", "--step-rows", "1,2", "--step-history", "4",
           "--step-steps", "2", "--budget-s", "600"]  # fmt: skip


def _numbers_or_skipped(item: dict) -> bool:
    return "skipped" in item or any(isinstance(v, int | float) and not isinstance(v, bool) for v in item.values())


@pytest.mark.slow
def test_dry_run_on_cpu_writes_every_section_within_the_gpu_machines_packages(tmp_path, tiny_checkpoint):
    allowed = ",".join(GPU_MACHINE_PACKAGES + carried_wheels() + STAND_INS)
    proc = subprocess.run([sys.executable, "-c", GUARD, allowed, "--out", str(tmp_path), *DRY_RUN],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip  (a hang guard)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The guard was at work: transformers looked for soxr (optional), which neither the machine nor the kit has.
    # torchcodec, which torchaudio.load needs, is hidden the same way: the seed path reads references without it.
    assert "soxr" in re.search(r"GUARD hidden: (.*)", proc.stderr).group(1)

    report = json.loads((tmp_path / "gpu-report.json").read_text())
    md = (tmp_path / "gpu-report.md").read_text()
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["date"] and "device_name" in env and "cuda" in env
    s = report["sections"]
    assert set(s) == set(SECTIONS)
    for name in SECTIONS:  # with a generous budget nothing is skipped here
        assert s[name]["status"] == "ok", (name, s[name])

    eq = s["equivalence"]
    assert eq["codes_identical"] is True and len(eq["rows"]) == 2
    assert eq["max_abs_wave_diff"] < 1e-4

    (half,) = s["half_precision"]["dtypes"].values()  # bfloat16 on a CPU
    assert 0 <= half["identical_code_share"] <= 1 and half["speedup"] > 0 and half["wave_rel_rms_diff_mean"] >= 0

    (point,) = s["vocoder"]["points"]
    assert point["batch_size"] == 2 and point["batched_s"] > 0 and point["per_row_s"] > 0

    for text in ("paragraph", "short_sentence"):  # first audio at c1: streamed beside whole, same seed
        a = s["first_audio"][text]
        assert len(a["runs"]["streamed"]) == len(a["runs"]["whole"]) == 1
        assert 0 < a["first_audio_p50_s"] <= a["streamed_total_p50_s"] and a["whole_latency_p50_s"] > 0
        assert a["audio_s"] > 0 and a["rtf_c1"] > 0
    assert s["first_audio"]["paragraph"]["chars"] > 200 > s["first_audio"]["short_sentence"]["chars"]

    points = s["load"]["points"]  # c2: a burst and an open loop, each continuous then static
    assert [(p["kind"], p["scheduling"]) for p in points] == [
        ("burst", "continuous"), ("burst", "static"), ("open_loop", "continuous"), ("open_loop", "static")]
    for p in points:
        assert p["requests"] == 4 and p["n_errors"] == 0 and p["streamed"] == 1, p  # 1 in 6: request 0
        assert p["audio_s_per_s"] > 0 and p["latency_p50_s"] <= p["latency_p95_s"]
        # The streamed job's first audio comes before its end, so before the slowest job's end (an interpolated
        # p95 of 4 latencies can fall below the one streamed job's latency).
        assert 0 < p["stream_first_audio_p50_s"] <= p["latency_max_s"] and p["peak_gpu_mem_mib"] is None
    assert points[2]["arrival_rate_per_s"] == pytest.approx(0.9 * points[0]["requests_per_s"])
    assert set(s["load"]["continuous_over_static"]) == {"c2_burst", "c2_open_loop"}

    steps = s["step"]["rows"]
    # Both KV caches on the CPU (no CUDA graphs there), each at every row count.
    assert [(r["path"], r["rows"]) for r in steps] == [("dynamic", 1), ("dynamic", 2), ("static", 1), ("static", 2)]
    assert not any(r["graphs_replayed"] for r in steps)
    for r in steps:
        assert r["steps"] == 2 and 0 < r["ms_per_step_min"] <= r["ms_per_step_p50"] and r["kv_positions_per_row"] > 4
    assert steps[1]["audio_s_per_step"] == pytest.approx(2 * steps[0]["audio_s_per_step"])

    rows = s["throughput"]["rows"]
    assert [(r["path"].split()[0], r["batch_size"]) for r in rows] == [("seed", 1), ("batched", 1), ("batched", 2)]
    for r in rows:
        assert r["runs"] == 2 and r["audio_s"] > 0 and r["audio_s_per_s"] > 0  # ABBA: each point twice
        assert r["peak_gpu_mem_mib"] is None  # a CPU has no GPU memory to report
    assert rows[0]["ratio_vs_seed"] == 1.0 and rows[0]["vocoder_share"] is None
    assert all(0 < r["vocoder_share"] < 1 for r in rows[1:])

    rec = s["recommendation"]
    assert rec["MAX_BATCH_SIZE"] in (1, 2) and rec["XTTS_VOCODER_BATCHING"] in ("batched", "per_row")
    assert "MAX_BATCH_SIZE" in rec["rules"] and "XTTS_VOCODER_BATCHING" in rec["rules"]
    targets = rec["targets"]
    # The step targets take the fastest path measured at that row count.
    assert targets["step_ms_1_row"]["measured"] == min(r["ms_per_step_p50"] for r in steps if r["rows"] == 1)
    assert targets["step_ms_64_rows"]["measured"] is None and targets["step_ms_64_rows"]["met"] is None
    assert targets["first_audio_c1_s"]["measured"] == s["first_audio"]["paragraph"]["first_audio_p50_s"]
    for heading in ("Equivalence", "First audio at c1", "Load: continuous against static", "Decoding step",
                    "Half precision", "Vocoder", "Throughput", "Recommendation", "Issue #24's targets"):
        assert f"## {heading}" in md
    assert f"`MAX_BATCH_SIZE={rec['MAX_BATCH_SIZE']}`" in md


@pytest.mark.slow
def test_a_spent_budget_skips_every_measurement_and_still_writes_the_report(tmp_path, tiny_checkpoint):
    from bench import gpu

    assert gpu.main(["--out", str(tmp_path), *DRY_RUN[:-2], "--budget-s", "0.001"]) == 0
    report = json.loads((tmp_path / "gpu-report.json").read_text())
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "skipped" and section["skipped"], (name, section)
        assert _numbers_or_skipped(section)
    assert "**skipped**: time budget" in (tmp_path / "gpu-report.md").read_text()


def test_the_carried_wheels_are_pinned_and_cover_the_model_code():
    wheels = carried_wheels()
    text = WHEELS_SH.read_text()
    assert {"coqui-tts", "coqpit-config", "coqui-tts-trainer", "transformers", "soundfile"} <= set(wheels)
    assert "transformers==5.23.0" in text and "coqui-tts==0.28.0" in text
    assert all(re.search(rf"^  {re.escape(w)}==\S+$", text, re.M) for w in wheels)  # exact pins, one per line
    # Nothing the GPU machine already has at a fitting version travels (transformers shadows 5.17 on purpose,
    # regex is checked by transformers 5.23 against a version the machine may lack).
    assert set(wheels) & {p for p in GPU_MACHINE_PACKAGES} <= {"transformers", "regex"}


@pytest.mark.parametrize("script", [WHEELS_SH, CHECK_SH], ids=lambda p: p.name)
def test_gpu_scripts_are_clean_under_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
