#!/usr/bin/env bash
# Regenerates the three lock files, with a sha256 hash of every file of every pinned release:
#   requirements.lock       the runtime packages (pyproject.toml): what the Docker image installs
#                           (`pip install --require-hashes`) and what start.sh installs for fetched code;
#   requirements-test.lock  the runtime packages at the same versions plus the `test` and `bench` extras: what
#                           scripts/setup.sh installs on a developer's machine and in CI (never in the image);
#   requirements-build.lock the tools that build the lock's sdist-only packages in the Dockerfile's build stage
#                           (requirements-build.in: Cython, wheel), at the runtime lock's versions where shared;
#                           never in the image.
# All are universal (any platform, Python >= 3.11.3: gcloud-aio-auth needs 3.11.3; the Dockerfile asserts the same
# minimum, PYTHON_MIN), so one file serves the image (CPython 3.12 on Ubuntu 24.04), the image rehearsal (3.13 on
# Debian trixie) and a developer's 3.11 alike. Existing pins are kept: uv only moves a pin when pyproject.toml asks
# for it, or with `bash scripts/lock.sh --upgrade` (or `--upgrade-package NAME`).
# Needs uv (`pip install uv`; made with uv 0.13.9) and PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv="${UV:-uv}"
python_min=3.11.3
common=(--universal --python-version "$python_min" --generate-hashes --index-url https://pypi.org/simple
  --custom-compile-command "bash scripts/lock.sh" --quiet)
"$uv" pip compile pyproject.toml "${common[@]}" "$@" -o requirements.lock
"$uv" pip compile pyproject.toml --extra test --extra bench -c requirements.lock "${common[@]}" "$@" \
  -o requirements-test.lock
"$uv" pip compile requirements-build.in -c requirements.lock "${common[@]}" "$@" -o requirements-build.lock
