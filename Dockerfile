# XTTS-v2 voice-cloning worker for RunPod serverless: CUDA runtime, Python 3.12, the pinned packages of
# requirements.lock, FFmpeg's libraries, and the XTTS-v2 weights baked in so a cold start downloads nothing.
#
#   docker build --build-arg COQUI_TOS_AGREED=1 --build-arg XTTS_REVISION=... --build-arg XTTS_*_SHA256=... \
#     -t you/xtts-runpod:TAG .
#
# Needs BuildKit (Docker 23 and newer use it by default; Docker 20.10: DOCKER_BUILDKIT=1).
#
# COQUI_TOS_AGREED=1 says you accept the Coqui Public Model License (https://coqui.ai/cpml) of the XTTS-v2
# weights; without it the build stops at the weights step and says so. The weights come from one of two places,
# and are checked file by file against the sha256 build arguments, which have no default:
#   - the Hugging Face hub: XTTS_REVISION (a full commit of the repository XTTS_HF_REPO) names what is downloaded;
#   - a folder of the build context, XTTS_WEIGHTS_DIR (default `weights/`, empty in the repository): put
#     config.json, model.pth and vocab.json there and the build uses them and never reaches the hub.
# A build that does not name the hashes stops, and a file whose hash differs stops it too (README, "Docker").
#
# Everything the image installs is verified: pip itself and every package of requirements.lock by sha256
# (`--require-hashes`, wheels only but for the two sdist-only packages, built without fetching anything); the test
# tools (requirements-test.lock) never enter the image.
#
# CUDA: torch's PyPI wheels (requirements.lock) carry their own CUDA 13 and cuDNN libraries (the nvidia-*
# packages), so the base image is the plain CUDA 13.0 *runtime* image of the same major version (a cudnn image
# would only duplicate about a gigabyte). The host needs an NVIDIA driver that supports CUDA 13 (>= 580).
#
# BASE_IMAGE and PYTHON exist for scripts/image-rehearsal.sh, which builds this file on a machine without Docker
# Hub from a locally made Debian base (README, "The image rehearsal"); a production build leaves both alone.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
# The interpreter: the distribution's package of that name and its venv module (Ubuntu 24.04: python3.12, 3.12.3).
ARG PYTHON=python3.12

# ---- runtime: what every stage and the image share --------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG PYTHON
# The oldest Python requirements.lock installs on (scripts/lock.sh locks for it: gcloud-aio-auth needs 3.11.3).
ARG PYTHON_MIN=3.11.3
ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python, FFmpeg's shared libraries (torchcodec, under torchaudio, loads them), git for start.sh's code refresh.
# Then, before anything is installed with it, the interpreter is checked against what the lock needs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        ffmpeg \
        git \
        "$PYTHON" \
        "$PYTHON-venv" \
    && rm -rf /var/lib/apt/lists/* \
    && "$PYTHON" -c 'import sys, platform; \
need = tuple(int(part) for part in sys.argv[1].split(".")); \
sys.exit(0 if sys.version_info[:3] >= need else \
f"{sys.executable} is Python {platform.python_version()}, but requirements.lock needs {sys.argv[1]} or newer: \
choose a base image (BASE_IMAGE) and PYTHON with a newer interpreter")' "$PYTHON_MIN"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# ---- packages: the virtual environment, built with a compiler that never reaches the image ---------------------
FROM runtime AS packages
ARG PYTHON
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A C++ compiler and the Python headers, for the three packages PyPI has no wheel of for every Python (below).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ "lib$PYTHON-dev" \
    && rm -rf /var/lib/apt/lists/*

# One virtual environment holds every package; start.sh's overlay environments (fetched code) build on it.
# pip itself by hash (both files of the pip 26.3 release on PyPI).
RUN "$PYTHON" -m venv /opt/venv \
    && echo "pip==26.3" \
        "--hash=sha256:6c36ae7da8695be67e3cd9f7d87919667ced53f57ce2ede75d89b5912ed2bc4c" \
        "--hash=sha256:f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13" >/tmp/pip.lock \
    && python -m pip install --no-cache-dir --require-hashes -r /tmp/pip.lock \
    && rm /tmp/pip.lock

# Every file is checked against the locks' sha256 hashes. Wheels only, but for docopt and unidic-lite (sdists alone
# on PyPI) and mojimoji (Cython; no wheel for Python 3.13): they are built without build isolation, by the lock's
# own setuptools (installed first, by hash, with packaging: the build tools' folder must not be where pip finds the
# venv's copy of it) and the build tools of requirements-build.lock (Cython, wheel: by
# hash, in a folder of their own that the image never gets), so no build tool is fetched unverified. `pip check`
# then proves the lock was complete (--no-deps installs nothing it does not list).
WORKDIR /build
COPY requirements.lock requirements-build.lock ./
RUN awk '/^(setuptools|packaging)==/ { keep = 1 } keep { print } keep && !/\\$/ { keep = 0 }' requirements.lock \
        >/tmp/backend.lock \
    && python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/backend.lock \
    && python -m pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
        --target /build/tools -r requirements-build.lock \
    && PYTHONPATH=/build/tools python -m pip install --no-cache-dir --require-hashes --no-deps \
        --only-binary=:all: --no-binary=docopt,unidic-lite,mojimoji --no-build-isolation -r requirements.lock \
    && python -m pip check \
    && rm -rf /tmp/backend.lock /build/tools

# ---- the image -------------------------------------------------------------------------------------------------
FROM runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG COQUI_TOS_AGREED=0
ARG XTTS_HF_REPO=coqui/XTTS-v2
ARG XTTS_REVISION
ARG XTTS_CONFIG_SHA256
ARG XTTS_MODEL_SHA256
ARG XTTS_VOCAB_SHA256
ARG XTTS_WEIGHTS_DIR=weights

COPY --from=packages /opt/venv /opt/venv
WORKDIR /app

# The weights, in /models/xtts_v2, the folder XTTS_MODEL_DIR names, so the worker loads a local folder and never
# asks the hub. From XTTS_WEIGHTS_DIR when it holds them, else downloaded at XTTS_REVISION; either way each file
# must match its sha256 build argument (a missing argument or a different file fails the build), and SOURCE
# records where they came from.
ENV HF_HOME=/models/hf
COPY ${XTTS_WEIGHTS_DIR}/ /models/xtts_v2/
RUN if [ "$COQUI_TOS_AGREED" != "1" ]; then \
        echo "Set --build-arg COQUI_TOS_AGREED=1 to accept the Coqui Public Model License of XTTS-v2" >&2; \
        exit 1; \
    fi \
    && : "${XTTS_CONFIG_SHA256:?Set --build-arg XTTS_CONFIG_SHA256 (the README, section Docker, says how)}" \
    && : "${XTTS_MODEL_SHA256:?Set --build-arg XTTS_MODEL_SHA256 (the README, section Docker, says how)}" \
    && : "${XTTS_VOCAB_SHA256:?Set --build-arg XTTS_VOCAB_SHA256 (the README, section Docker, says how)}" \
    && held="$(find /models/xtts_v2 -maxdepth 1 -type f \( -name config.json -o -name model.pth -o -name vocab.json \) | wc -l)" \
    && if [ "$held" = 3 ]; then \
        printf 'local:%s\n' "$XTTS_WEIGHTS_DIR" >/models/xtts_v2/SOURCE; \
    elif [ "$held" != 0 ]; then \
        echo "$XTTS_WEIGHTS_DIR holds $held of config.json, model.pth and vocab.json: give all three, or none to download them" >&2; \
        exit 1; \
    else \
        : "${XTTS_REVISION:?Set --build-arg XTTS_REVISION, or put the weights in XTTS_WEIGHTS_DIR (the README, section Docker, says how)}" \
        && if ! echo "$XTTS_REVISION" | grep -Eqx '[0-9a-f]{40}'; then \
            echo "XTTS_REVISION must be a full 40-hex commit of $XTTS_HF_REPO, got '$XTTS_REVISION'" >&2; \
            exit 1; \
        fi \
        && python -c "import sys; from huggingface_hub import hf_hub_download; \
[hf_hub_download(sys.argv[1], name, revision=sys.argv[2], local_dir='/models/xtts_v2') for name in sys.argv[3:]]" \
            "$XTTS_HF_REPO" "$XTTS_REVISION" config.json model.pth vocab.json \
        && rm -rf /models/xtts_v2/.cache /models/hf \
        && printf '%s@%s\n' "$XTTS_HF_REPO" "$XTTS_REVISION" >/models/xtts_v2/SOURCE; \
    fi \
    && printf '%s  %s\n' \
        "$XTTS_CONFIG_SHA256" /models/xtts_v2/config.json \
        "$XTTS_MODEL_SHA256" /models/xtts_v2/model.pth \
        "$XTTS_VOCAB_SHA256" /models/xtts_v2/vocab.json \
        | sha256sum --check --strict

# The project itself (the code start.sh falls back to), installed into the environment too: the worker's packages
# only (pyproject.toml's), never bench/ or testing/ (benchmarks and test doubles).
COPY pyproject.toml README.md ./
COPY batching ./batching
COPY server ./server
COPY storage ./storage
COPY test_input.json ./
COPY --chmod=755 start.sh ./
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info

# Defaults for the image; every other variable keeps the default written in server/config.py.
#   RUNPOD_LOG_LEVEL: the SDK's own default is DEBUG, which prints every job's output (signed URLs) to the log.
#   HF_HUB_OFFLINE: the weights are baked; nothing may reach for the network at start.
ENV XTTS_MODEL_DIR=/models/xtts_v2 \
    HF_HUB_OFFLINE=1 \
    RUNPOD_LOG_LEVEL=INFO \
    APP_DIR=/app \
    CODE_DIR=/workspace/code \
    PYTHON_BIN=/opt/venv/bin/python

# Run as an unprivileged user, uid 1000; it owns only the folder where start.sh puts fetched code. Ubuntu 24.04's
# images already have a user of that uid (ubuntu), which goes first.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin worker \
    && mkdir -p /workspace/code \
    && chown worker:worker /workspace/code
USER 1000:1000

# 9090: Prometheus metrics (METRICS_PORT). 8000: the HTTP API with SERVER_MODE=http (PORT; GET /ping on PORT_HEALTH,
# by default the same port), for a RunPod load-balancing endpoint: set PORT=8000 and PORT_HEALTH=8000 in the
# endpoint's environment and expose 8000 there (RunPod's own default, 80, needs root, and this image runs as uid
# 1000). Queue endpoints (SERVER_MODE=queue, the default) listen on no port but METRICS_PORT.
EXPOSE 8000 9090
ENTRYPOINT ["/app/start.sh"]
