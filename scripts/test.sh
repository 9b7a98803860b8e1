#!/usr/bin/env bash
# The one command that runs every test:
#   1. scripts/setup.sh                       (installs what is missing; ~1 s when ready)
#   2. cargo test --workspace                 (kernels on the native adapter, e.g. Mesa lavapipe,
#                                              naga validation of every shader variant, unit tests)
#   3. cargo build -p loralab-web --target wasm32-unknown-unknown   (the browser build compiles)
#   4. trunk build --release                  (dist/: the web app)
#   5. the browser test (tests/browser)       (headless Chromium runs the self-test on WebGPU)
# Build outputs go to CARGO_TARGET_DIR (default ~/.cache/loralab/target, outside the clone, so
# repeated runs are incremental). Extra arguments are passed to `cargo test`.
#   scripts/test.sh
#   scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/loralab/target}
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
# Mesa warns without a private runtime directory.
XDG_RUNTIME_DIR=$(mktemp -d "${TMPDIR:-/tmp}/loralab-xdg.XXXXXX")
chmod 700 "$XDG_RUNTIME_DIR"
export XDG_RUNTIME_DIR
trap 'rm -rf "$XDG_RUNTIME_DIR"' EXIT

timings=()
stage() {
  local name=$1
  shift
  printf '\n\033[1m[test] %s\033[0m\n' "$name"
  local t0=$SECONDS
  if ! "$@"; then
    printf '\n\033[1;31m[test] FAILED: %s (after %ss)\033[0m\n' "$name" "$((SECONDS - t0))" >&2
    exit 1
  fi
  timings+=("$(printf '%5ss  %s' "$((SECONDS - t0))" "$name")")
}

stage "cargo test --workspace" cargo test --workspace "$@"
stage "wasm32 build (loralab-web)" cargo build -p loralab-web --target wasm32-unknown-unknown
stage "trunk build --release" trunk build --release
stage "browser test (headless Chromium, WebGPU)" bash -c 'cd tests/browser && npm test'

printf '\n\033[1;32m[test] all passed\033[0m\n'
printf '%s\n' "${timings[@]}"
