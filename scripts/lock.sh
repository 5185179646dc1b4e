#!/usr/bin/env bash
# Regenerates the two lock files from pyproject.toml, with a sha256 hash of every file of every pinned release:
#   requirements.lock       the runtime packages: what the Docker image installs (`pip install --require-hashes`)
#                           and what start.sh installs for fetched code;
#   requirements-test.lock  the runtime packages at the same versions plus the `test` and `bench` extras: what
#                           scripts/setup.sh installs on a developer's machine and in CI (never in the image).
# Both are universal (any platform, Python >= 3.11.3: gcloud-aio-auth needs 3.11.3), so one file serves the image
# (Linux x86_64, CPython 3.11) and CPython 3.12 alike. Existing pins are kept: uv only moves a pin when pyproject.toml
# asks for it, or with `bash scripts/lock.sh --upgrade` (or `--upgrade-package NAME`).
# Needs uv (`pip install uv`; made with uv 0.13.9) and PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv="${UV:-uv}"
common=(--universal --python-version 3.11.3 --generate-hashes --index-url https://pypi.org/simple
  --custom-compile-command "bash scripts/lock.sh" --quiet)
"$uv" pip compile pyproject.toml "${common[@]}" "$@" -o requirements.lock
"$uv" pip compile pyproject.toml --extra test --extra bench -c requirements.lock "${common[@]}" "$@" \
  -o requirements-test.lock
