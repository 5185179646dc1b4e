#!/usr/bin/env bash
# Runs the worker on embedded defaults, on a fresh machine too: no cloud account, no downloaded weights.
#   - installs what it needs (scripts/setup.sh);
#   - builds a small random-weight demo checkpoint when XTTS_MODEL_DIR is not set;
#   - local storage under .cache/local_storage, with the seed example's reference voice
#     (gs://seu-bucket/referencias/voz_joao.wav, a synthetic voice) already in it;
#   - starts `python -m server --rp_serve_api`: RunPod's local test API on http://127.0.0.1:${RP_API_PORT:-8000}
#     (POST /runsync with test_input.json), metrics on http://127.0.0.1:${METRICS_PORT:-9090}/metrics.
#   - or, with SERVER_MODE=http, the OpenAI-compatible HTTP server (server/http_server.py) on
#     http://${HOST:-127.0.0.1}:${PORT:-8000} (POST /v1/audio/speech, POST /tts, GET /ping); the seed voice is the
#     voice `voz_joao` through VOICE_REF_URL_TEMPLATE (default gs://$GCS_BUCKET_NAME/referencias/{voice}.wav).
# Every setting can be overridden from the environment (see the README's Configuration section).
# Extra arguments go to the worker, e.g. `scripts/run-worker.sh --test_input "$(cat test_input.json)"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
py="$root/.venv/bin/python"

if [ -z "${XTTS_MODEL_DIR:-}" ]; then
  export XTTS_MODEL_DIR="$root/.cache/demo/worker-small"
  [ -f "$XTTS_MODEL_DIR/DEMO.json" ] || "$py" -m batching.demo "$XTTS_MODEL_DIR" --size small
fi
export STORAGE_BACKEND="${STORAGE_BACKEND:-local}"
export LOCAL_STORAGE_DIR="${LOCAL_STORAGE_DIR:-$root/.cache/local_storage}"
export GCS_BUCKET_NAME="${GCS_BUCKET_NAME:-seu-bucket}"
export AUDIO_CACHE_DIR="${AUDIO_CACHE_DIR:-$root/.cache/audio_cache}"
export LATENT_CACHE_DIR="${LATENT_CACHE_DIR:-$root/.cache/latent_cache}"
ref="$LOCAL_STORAGE_DIR/$GCS_BUCKET_NAME/referencias/voz_joao.wav"
if [ ! -f "$ref" ]; then
  mkdir -p "$(dirname "$ref")"
  "$py" -c "import sys, soundfile as sf; from testing.voices import synthetic_voice; sf.write(sys.argv[1], synthetic_voice(6.0), 22050)" "$ref"
fi

if [ "${SERVER_MODE:-queue}" = "http" ]; then
  export HOST="${HOST:-127.0.0.1}"
  export PORT="${PORT:-8000}"
  seed_voices="gs://$GCS_BUCKET_NAME/referencias/{voice}.wav" # the seed voice: voice voz_joao
  export VOICE_REF_URL_TEMPLATE="${VOICE_REF_URL_TEMPLATE:-$seed_voices}"
elif [ $# -eq 0 ]; then
  set -- --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port "${RP_API_PORT:-8000}"
fi
exec "$py" -m server "$@"
