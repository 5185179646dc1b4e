# syntax=docker/dockerfile:1
# XTTS-v2 voice-cloning worker for RunPod serverless: CUDA runtime, Python 3.11, the pinned packages of
# requirements.lock, FFmpeg's libraries, and the XTTS-v2 weights baked in so a cold start downloads nothing.
#
#   docker build --build-arg COQUI_TOS_AGREED=1 -t you/xtts-runpod:TAG .
#
# COQUI_TOS_AGREED=1 says you accept the Coqui Public Model License (https://coqui.ai/cpml) of the XTTS-v2
# weights; without it the build stops at the weights step and says so. The weights are pinned: XTTS_REVISION (a
# commit of the Hugging Face repository XTTS_HF_REPO) and the sha256 of each file are build arguments without a
# default, so a build that does not name them stops, and a file whose hash differs stops it too (README, "Docker").
#
# Everything the image installs is verified: pip itself and every package of requirements.lock by sha256
# (`--require-hashes`, wheels only but for the two sdist-only packages, built without fetching anything); the test
# tools (requirements-test.lock) never enter the image.
#
# CUDA: torch's PyPI wheels (requirements.lock) carry their own CUDA 13 and cuDNN libraries (the nvidia-*
# packages), so the base image is the plain CUDA 13.0 *runtime* image of the same major version (a cudnn image
# would only duplicate about a gigabyte). The host needs an NVIDIA driver that supports CUDA 13 (>= 580).
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ARG COQUI_TOS_AGREED=0
ARG DEBIAN_FRONTEND=noninteractive
ARG XTTS_HF_REPO=coqui/XTTS-v2
ARG XTTS_REVISION
ARG XTTS_CONFIG_SHA256
ARG XTTS_MODEL_SHA256
ARG XTTS_VOCAB_SHA256

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (Ubuntu 22.04's python3.11 package), FFmpeg's shared libraries (torchcodec, under torchaudio, loads
# them), git for start.sh's code refresh.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        ffmpeg \
        git \
        python3.11 \
        python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# One virtual environment holds every package; start.sh's overlay environments (fetched code) build on it.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# pip itself by hash (both files of the pip 26.3 release on PyPI).
RUN python3.11 -m venv /opt/venv \
    && echo "pip==26.3" \
        "--hash=sha256:6c36ae7da8695be67e3cd9f7d87919667ced53f57ce2ede75d89b5912ed2bc4c" \
        "--hash=sha256:f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13" >/tmp/pip.lock \
    && python -m pip install --no-cache-dir --require-hashes -r /tmp/pip.lock \
    && rm /tmp/pip.lock

WORKDIR /app

# The pinned packages first: this layer changes only when requirements.lock does. Every file is checked against
# the lock's sha256 hashes. Wheels only, but for docopt and unidic-lite, which PyPI has as sdists alone: they are
# built without build isolation by the lock's own setuptools (installed first, by hash), so no build tool is
# fetched unverified. `pip check` then proves the lock was complete (--no-deps installs nothing it does not list).
COPY requirements.lock ./
RUN awk '/^setuptools==/ { keep = 1 } keep { print } keep && !/\\$/ { exit }' requirements.lock >/tmp/build.lock \
    && python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/build.lock \
    && rm /tmp/build.lock \
    && python -m pip install --no-cache-dir --require-hashes --no-deps \
        --only-binary=:all: --no-binary=docopt,unidic-lite --no-build-isolation -r requirements.lock \
    && python -m pip check

# The weights, pinned to one commit of the Hugging Face repository and checked file by file against the sha256
# build arguments (a missing argument or a different file fails the build). They land in /models/xtts_v2, the
# folder XTTS_MODEL_DIR names, so the worker loads a local folder and never asks the hub.
ENV HF_HOME=/models/hf
RUN if [ "$COQUI_TOS_AGREED" != "1" ]; then \
        echo "Set --build-arg COQUI_TOS_AGREED=1 to accept the Coqui Public Model License of XTTS-v2" >&2; \
        exit 1; \
    fi \
    && : "${XTTS_REVISION:?Set --build-arg XTTS_REVISION (the README, section Docker, says how)}" \
    && : "${XTTS_CONFIG_SHA256:?Set --build-arg XTTS_CONFIG_SHA256 (the README, section Docker, says how)}" \
    && : "${XTTS_MODEL_SHA256:?Set --build-arg XTTS_MODEL_SHA256 (the README, section Docker, says how)}" \
    && : "${XTTS_VOCAB_SHA256:?Set --build-arg XTTS_VOCAB_SHA256 (the README, section Docker, says how)}" \
    && if ! echo "$XTTS_REVISION" | grep -Eqx '[0-9a-f]{40}'; then \
        echo "XTTS_REVISION must be a full 40-hex commit of $XTTS_HF_REPO, got '$XTTS_REVISION'" >&2; \
        exit 1; \
    fi \
    && python -c "import sys; from huggingface_hub import hf_hub_download; \
[hf_hub_download(sys.argv[1], name, revision=sys.argv[2], local_dir='/models/xtts_v2') for name in sys.argv[3:]]" \
        "$XTTS_HF_REPO" "$XTTS_REVISION" config.json model.pth vocab.json \
    && printf '%s  %s\n' \
        "$XTTS_CONFIG_SHA256" /models/xtts_v2/config.json \
        "$XTTS_MODEL_SHA256" /models/xtts_v2/model.pth \
        "$XTTS_VOCAB_SHA256" /models/xtts_v2/vocab.json \
        | sha256sum --check --strict \
    && rm -rf /models/xtts_v2/.cache /models/hf \
    && printf '%s@%s\n' "$XTTS_HF_REPO" "$XTTS_REVISION" >/models/xtts_v2/SOURCE

# The project itself (the code start.sh falls back to), installed into the environment too: the worker's packages
# only (pyproject.toml's), never bench/ or testing/ (benchmarks and test doubles).
COPY pyproject.toml README.md ./
COPY batching ./batching
COPY server ./server
COPY storage ./storage
COPY test_input.json ./
COPY --chmod=755 start.sh ./
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation .

# Defaults for the image; every other variable keeps the default written in server/config.py.
#   RUNPOD_LOG_LEVEL: the SDK's own default is DEBUG, which prints every job's output (signed URLs) to the log.
#   HF_HUB_OFFLINE: the weights are baked; nothing may reach for the network at start.
ENV XTTS_MODEL_DIR=/models/xtts_v2 \
    HF_HUB_OFFLINE=1 \
    RUNPOD_LOG_LEVEL=INFO \
    APP_DIR=/app \
    CODE_DIR=/workspace/code \
    PYTHON_BIN=/opt/venv/bin/python

# Run as an unprivileged user; it owns only the folder where start.sh puts fetched code.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin worker \
    && mkdir -p /workspace/code \
    && chown worker:worker /workspace/code
USER 1000:1000

# 9090: Prometheus metrics (METRICS_PORT). 8000: the HTTP API with SERVER_MODE=http (PORT; GET /ping on PORT_HEALTH,
# by default the same port), for a RunPod load-balancing endpoint: set PORT=8000 and PORT_HEALTH=8000 in the
# endpoint's environment and expose 8000 there (RunPod's own default, 80, needs root, and this image runs as uid
# 1000). Queue endpoints (SERVER_MODE=queue, the default) listen on no port but METRICS_PORT.
EXPOSE 8000 9090
ENTRYPOINT ["/app/start.sh"]
