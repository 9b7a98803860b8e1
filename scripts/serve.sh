#!/usr/bin/env bash
# The one command that serves the web app: installs what is missing, builds dist/ with trunk and
# serves it at http://127.0.0.1:8080 (PORT and HOST override; the browser needs WebGPU).
#   scripts/serve.sh
#   PORT=9000 scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/loralab/target}
trunk build --release
exec node scripts/serve-dist.mjs dist "${PORT:-8080}" "${HOST:-127.0.0.1}"
