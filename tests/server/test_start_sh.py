"""start.sh, the container entrypoint, against a real local git repository over file://.

The "baked" code and the repository's code are stub projects whose `python -m server` prints a marker, so each
test sees which code ran, with which arguments, and whether the requirements it installed are importable.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_SH = REPO / "start.sh"
TIMEOUT_S = 240  # a hang guard only

MAIN_PY = """import os, sys
try:
    import stubdep
    dep = stubdep.MARK
except ImportError:
    dep = "none"
print("MARKER {marker} dep=" + dep + " source=" + os.environ.get("CODE_SOURCE", "?")
      + " commit=" + os.environ.get("CODE_COMMIT", "-") + " args=" + " ".join(sys.argv[1:]))
"""


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
        env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"},
    )  # fmt: skip
    return result.stdout.strip()


def write_project(folder: Path, marker: str) -> None:
    (folder / "server").mkdir(parents=True, exist_ok=True)
    (folder / "server" / "__init__.py").write_text("")
    (folder / "server" / "__main__.py").write_text(MAIN_PY.format(marker=marker))


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def make_wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel `stubdep`, written by hand (pip installs it offline, no build step)."""
    dist = f"stubdep-{version}.dist-info"
    files = {
        "stubdep/__init__.py": f"MARK = 'stubdep-{version}'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: stubdep\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"stubdep-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.fixture
def setup(tmp_path):
    """A baked stub at APP_DIR, a git repository (branch main: v1 then v2; tag v1) and a CODE_DIR."""
    baked = tmp_path / "baked"
    write_project(baked, "BAKED")
    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    write_project(origin, "FETCHED-v1")
    v1 = commit_all(origin, "v1")
    git(origin, "tag", "v1")
    write_project(origin, "FETCHED-v2")
    v2 = commit_all(origin, "v2")
    return {"tmp": tmp_path, "baked": baked, "origin": origin, "v1": v1, "v2": v2, "code": tmp_path / "code"}


def run_start(setup, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "PIP_", "CODE_"))}
    base.update(
        APP_DIR=str(setup["baked"]), CODE_DIR=str(setup["code"]), PYTHON_BIN=sys.executable,
        PIP_NO_INDEX="1",  # the tests never reach a package index
        PIP_CONFIG_FILE=os.devnull,  # nor read this machine's pip configuration
        GIT_TIMEOUT_S="60",
    )  # fmt: skip
    base.update(env)
    result = subprocess.run(
        ["bash", str(START_SH), *args], cwd=setup["tmp"], env=base, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    return result


def url(setup) -> str:
    return setup["origin"].as_uri()


def test_without_a_repository_the_baked_code_runs_with_the_arguments(setup):
    result = run_start(setup, "--rp_serve_api", "--rp_api_port", "8000")
    assert result.stdout.strip() == "MARKER BAKED dep=none source=baked commit=- args=--rp_serve_api --rp_api_port 8000"
    assert not setup["code"].exists()


def test_the_default_branch_is_fetched_and_run(setup):
    result = run_start(setup, "--x", GITHUB_REPO_URL=url(setup))
    assert result.stdout.strip() == f"MARKER FETCHED-v2 dep=none source=fetched commit={setup['v2']} args=--x"
    assert (setup["code"] / "trees" / setup["v2"] / "server" / "__main__.py").is_file()


@pytest.mark.parametrize("ref", ["v1", "commit", "short-commit", "branch"])
def test_github_ref_pins_a_tag_commit_or_branch(setup, ref):
    origin = setup["origin"]
    if ref == "branch":
        git(origin, "branch", "old", setup["v1"])
        pinned = "old"
    else:
        pinned = {"v1": "v1", "commit": setup["v1"], "short-commit": setup["v1"][:10]}[ref]
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=pinned)
    assert result.stdout.startswith(f"MARKER FETCHED-v1 dep=none source=fetched commit={setup['v1']} ")


def test_a_new_push_is_picked_up_by_the_next_start(setup):
    assert "FETCHED-v2" in run_start(setup, GITHUB_REPO_URL=url(setup)).stdout
    write_project(setup["origin"], "FETCHED-v3")
    v3 = commit_all(setup["origin"], "v3")
    result = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert result.stdout.startswith(f"MARKER FETCHED-v3 dep=none source=fetched commit={v3} ")
    # The previous tree is pruned; only the running one is kept.
    assert sorted(p.name for p in (setup["code"] / "trees").iterdir()) == [v3]


def test_an_unreachable_repository_falls_back_to_the_baked_code(setup):
    missing = (setup["tmp"] / "no-such-repo").as_uri()
    result = run_start(setup, "--a", GITHUB_REPO_URL=missing)
    assert result.stdout.strip() == "MARKER BAKED dep=none source=baked commit=- args=--a"
    assert "cannot fetch" in result.stderr and "falling back to the baked code" in result.stderr


def test_a_bad_ref_falls_back_to_the_baked_code(setup):
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF="no-such-branch")
    assert result.stdout.startswith("MARKER BAKED ")
    assert "GITHUB_REF 'no-such-branch' names no branch, tag or commit" in result.stderr


def test_a_repository_that_is_not_this_project_falls_back(setup):
    other = setup["tmp"] / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "README").write_text("not a worker\n")
    sha = commit_all(other, "other")
    result = run_start(setup, GITHUB_REPO_URL=other.as_uri())
    assert result.stdout.startswith("MARKER BAKED ")
    assert "has no server/__main__.py" in result.stderr
    # Nothing half-made is left where a later start would pick it up.
    assert not (setup["code"] / "trees" / sha).exists()
    assert list((setup["code"] / "trees").glob(".incoming.*")) == []


def test_a_killed_run_leaves_nothing_that_is_used(setup):
    leftover = setup["code"] / "trees" / ".incoming.abc123"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_text("")
    result = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert "FETCHED-v2" in result.stdout and not leftover.exists()


def test_a_credential_in_the_url_is_not_logged(setup):
    result = run_start(setup, GITHUB_REPO_URL="https://user:s3cret-token@127.0.0.1:9/repo.git", GIT_TIMEOUT_S="20")
    assert result.stdout.startswith("MARKER BAKED ")
    assert "s3cret-token" not in result.stderr and "https://127.0.0.1:9/repo.git" in result.stderr


def test_requirements_install_once_into_an_overlay_and_only_when_they_change(setup):
    origin = setup["origin"]
    make_wheel(origin / "wheels", "1.0")
    (origin / "requirements.txt").write_text("./wheels/stubdep-1.0-py3-none-any.whl\n")
    commit_all(origin, "needs stubdep 1.0")

    first = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert " dep=stubdep-1.0 source=fetched " in first.stdout
    assert "requirements changed: installing requirements.txt" in first.stderr
    # The image's own environment did not get the package: the baked code still runs without it.
    assert "dep=none" in run_start(setup).stdout

    again = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert " dep=stubdep-1.0 " in again.stdout
    assert "requirements unchanged" in again.stderr and "installing" not in again.stderr

    # requirements.lock wins over requirements.txt, and a new content means a new install.
    make_wheel(origin / "wheels", "2.0")
    (origin / "requirements.lock").write_text("./wheels/stubdep-2.0-py3-none-any.whl\n")
    commit_all(origin, "lock stubdep 2.0")
    upgraded = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert " dep=stubdep-2.0 " in upgraded.stdout
    assert "installing requirements.lock" in upgraded.stderr
    assert len(list((setup["code"] / "envs").iterdir())) == 1


def test_a_failing_install_falls_back_without_leaving_an_environment(setup):
    origin = setup["origin"]
    (origin / "requirements.txt").write_text("no-such-package-xtts-test==0.0.0\n")
    commit_all(origin, "impossible requirement")
    result = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert result.stdout.startswith("MARKER BAKED ")
    assert "installing requirements.txt failed" in result.stderr
    assert list((setup["code"] / "envs").iterdir()) == []


def test_code_that_does_not_import_falls_back(setup):
    origin = setup["origin"]
    (origin / "server" / "__init__.py").write_text("raise ImportError('broken push')\n")
    commit_all(origin, "broken")
    result = run_start(setup, GITHUB_REPO_URL=url(setup))
    assert result.stdout.startswith("MARKER BAKED ")
    assert "does not import" in result.stderr


def test_start_sh_is_clean_under_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, "--severity=style", str(START_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_start_sh_is_strict_and_executable():
    text = START_SH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(START_SH, os.X_OK)
