# syntax=docker/dockerfile:1
# XTTS-v2 voice-cloning worker for RunPod serverless: CUDA runtime, Python 3.11, the pinned packages of
# requirements.lock, FFmpeg's libraries, and the XTTS-v2 weights baked in so a cold start downloads nothing.
#
#   docker build --build-arg COQUI_TOS_AGREED=1 -t you/xtts-runpod:TAG .
#
# COQUI_TOS_AGREED=1 says you accept the Coqui Public Model License (https://coqui.ai/cpml) of the XTTS-v2
# weights; without it the build stops at the weights step and says so.
#
# CUDA: torch's PyPI wheels (requirements.lock) carry their own CUDA 13 and cuDNN libraries (the nvidia-*
# packages), so the base image is the plain CUDA 13.0 *runtime* image of the same major version (a cudnn image
# would only duplicate about a gigabyte). The host needs an NVIDIA driver that supports CUDA 13 (>= 580).
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ARG COQUI_TOS_AGREED=0
ARG DEBIAN_FRONTEND=noninteractive

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
RUN python3.11 -m venv /opt/venv \
    && python -m pip install --no-cache-dir pip==26.3

WORKDIR /app

# The pinned packages first: this layer changes only when requirements.lock does.
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir -r requirements.lock

# The weights, through the project's own loader. They land in the Hugging Face cache under /models and are
# linked at a fixed path that XTTS_MODEL_DIR names, so the worker loads a local folder and never asks the hub.
ENV HF_HOME=/models/hf \
    TTS_HOME=/models/tts
COPY batching ./batching
RUN if [ "$COQUI_TOS_AGREED" != "1" ]; then \
        echo "Set --build-arg COQUI_TOS_AGREED=1 to accept the Coqui Public Model License of XTTS-v2" >&2; \
        exit 1; \
    fi \
    && python -c "from batching.loading import fetch_released; print(fetch_released('xtts_v2'))" \
        | tail -n 1 >/tmp/xtts_folder \
    && ln -s "$(cat /tmp/xtts_folder)" /models/xtts_v2 \
    && rm /tmp/xtts_folder \
    && ls /models/xtts_v2/config.json /models/xtts_v2/model.pth /models/xtts_v2/vocab.json

# The project itself (the code start.sh falls back to), installed into the environment too.
COPY pyproject.toml README.md ./
COPY server ./server
COPY storage ./storage
COPY bench ./bench
COPY test_input.json ./
COPY --chmod=755 start.sh ./
RUN python -m pip install --no-cache-dir --no-deps .

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

EXPOSE 9090
ENTRYPOINT ["/app/start.sh"]
