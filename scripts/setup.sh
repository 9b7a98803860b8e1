#!/usr/bin/env bash
# Installs what loralab needs on a fresh Debian machine, skipping what is present.
# Usage: scripts/setup.sh            (everything: native, wasm, browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130
TRUNK_VERSION=0.21.14

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
need_apt=()
for pkg in mesa-vulkan-drivers libvulkan1 chromium chromium-driver binaryen pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# --- Rust toolchain pieces -------------------------------------------------
if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
  say "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

if ! wasm-bindgen --version 2>/dev/null | grep -q " ${WASM_BINDGEN_VERSION}\$"; then
  say "cargo install wasm-bindgen-cli ${WASM_BINDGEN_VERSION} (a few minutes)"
  cargo install wasm-bindgen-cli --version "=${WASM_BINDGEN_VERSION}" --force
fi

if ! trunk --version 2>/dev/null | grep -q " ${TRUNK_VERSION}\$"; then
  say "cargo install trunk ${TRUNK_VERSION} (about ten minutes)"
  cargo install trunk --version "=${TRUNK_VERSION}" --locked --force
fi

# --- npm packages for the browser tests ------------------------------------
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  say "npm install (tests/browser)"
  (cd tests/browser && npm install --no-audit --no-fund --silent)
fi
say "ready"
