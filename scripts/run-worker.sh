#!/usr/bin/env bash
# Runs the worker's main job on embedded defaults (no cloud account, no downloaded weights), on a fresh
# machine too: installs what it needs, builds a demo checkpoint when XTTS_MODEL_DIR is not set, then
# synthesizes the seed's example sentence with a synthetic reference voice into ./output.wav.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
py=.venv/bin/python
if [ -z "${XTTS_MODEL_DIR:-}" ]; then
  XTTS_MODEL_DIR="$root/.cache/demo/worker-small"
  [ -f "$XTTS_MODEL_DIR/DEMO.json" ] || "$py" -m batching.demo "$XTTS_MODEL_DIR" --size small
fi
ref="$root/.cache/reference-voice.wav"
[ -f "$ref" ] || "$py" -c "import soundfile as sf; from bench.voices import synthetic_voice; sf.write('$ref', synthetic_voice(6.0), 22050)"
exec "$py" -m batching.synthesize --model-dir "$XTTS_MODEL_DIR" --ref "$ref" --language pt \
  --text "Olá! Este é um exemplo de síntese de voz usando XTTS V2." -o "${OUTPUT:-output.wav}" "$@"
