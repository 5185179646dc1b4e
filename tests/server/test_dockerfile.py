"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and keep it consistent with
pyproject.toml, requirements.lock, start.sh and the worker's configuration."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from server.config import RELEASED_MODEL_NAMES, WorkerConfig

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def of(keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions() if name == keyword]


def image_env() -> dict[str, str]:
    env = {}
    for arguments in of("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained():
    text = (REPO / ".hadolint.yaml").read_text()
    rules = re.findall(r"^\s*-\s*(DL\d+|SC\d+)", text, flags=re.M)
    assert rules, "no ignores: then the file is not needed"
    for rule in rules:
        assert re.search(rf"#\s*{rule}\b", text), f"{rule} is ignored without a comment saying why"


def test_base_is_a_pinned_cuda_runtime_image_matching_torchs_cuda():
    (base,) = of("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"expected a pinned nvidia/cuda runtime tag, got {base!r}"
    # torch's wheels bring CUDA libraries of one major version; the base image must be the same major.
    cuda_runtime = lock_pins()["nvidia-cuda-runtime"]
    assert match.group(1) == cuda_runtime.split(".")[0]


def test_python_version_satisfies_requires_python():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    versions = set(re.findall(r"python(3\.\d+)\b", " ".join(of("RUN"))))
    assert versions == {"3.11"}
    assert "3.11" in SpecifierSet(pyproject["project"]["requires-python"])
    assert sys.version_info[:2] == (3, 11)  # the tests run the same minor version as the image


def test_installs_the_lock_then_the_project_without_dependencies():
    runs = of("RUN")
    lock_step = next(i for i, run in enumerate(runs) if "-r requirements.lock" in run)
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install .*--no-deps \.(\s|$)", run))
    assert lock_step < project_step
    copied_lock = next(i for i, copy in enumerate(of("COPY")) if "requirements.lock" in copy)
    assert copied_lock == 0, "requirements.lock is copied first so the package layer is cached"


def test_every_copied_path_exists_and_every_package_is_copied():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    sources = set()
    for arguments in of("COPY"):
        parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
        sources.update(parts[:-1])
    missing = sorted(source for source in sources if not (REPO / source).exists())
    assert missing == [], f"the build would fail: {missing} not in the repository"
    assert set(pyproject["tool"]["setuptools"]["packages"]) <= sources
    assert {"start.sh", "pyproject.toml", "requirements.lock"} <= sources


def test_baked_model_is_the_default_model_and_a_released_one():
    baked = re.findall(r"fetch_released\('([^']+)'\)", " ".join(of("RUN")))
    assert baked == [WorkerConfig().model]
    import batching.loading  # imports torch: only here, to check server.config's copy of the names

    assert RELEASED_MODEL_NAMES == tuple(batching.loading.RELEASED_MODELS)
    env = image_env()
    assert env["XTTS_MODEL_DIR"] == f"/models/{WorkerConfig().model}"
    assert f"/models/{WorkerConfig().model}" in " ".join(of("RUN"))


def test_terms_of_service_are_a_build_argument():
    assert "COQUI_TOS_AGREED=0" in of("ARG")
    assert '"$COQUI_TOS_AGREED" != "1"' in " ".join(of("RUN"))


def test_image_defaults_are_valid_worker_settings():
    env = image_env()
    config = WorkerConfig.from_env(env)  # with the real storage config: the image's env must satisfy both
    assert config.model_dir == env["XTTS_MODEL_DIR"]
    assert env["RUNPOD_LOG_LEVEL"] in ("INFO", "WARN", "ERROR")  # the SDK logs job outputs at DEBUG


def test_entrypoint_is_start_sh_with_the_image_paths():
    env = image_env()
    (workdir,) = of("WORKDIR")
    assert env["APP_DIR"] == workdir == "/app"
    assert of("ENTRYPOINT") == ['["/app/start.sh"]']
    assert any(copy.startswith("--chmod=755 start.sh") for copy in of("COPY"))
    assert env["PYTHON_BIN"] == "/opt/venv/bin/python" and "/opt/venv/bin" in env["PATH"]
    # start.sh's own defaults match the image's layout, so the ENV lines are documentation, not load-bearing.
    start = (REPO / "start.sh").read_text()
    assert 'APP_DIR="${APP_DIR:-/app}"' in start and 'CODE_DIR="${CODE_DIR:-/workspace/code}"' in start


def test_runs_as_a_non_root_user_that_owns_the_code_folder():
    users = of("USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "chown worker:worker /workspace/code" in " ".join(of("RUN"))


@pytest.mark.parametrize("package", ["torch", "coqui-tts", "transformers", "runpod"])
def test_key_packages_are_pinned_in_the_lock_the_image_installs(package):
    assert package in lock_pins()
