#!/usr/bin/env bash
# Installs what loralab needs on a Debian/Ubuntu machine, skipping every step already done:
#   - Mesa's software Vulkan driver (lavapipe), so native wgpu runs without a GPU
#   - Chromium (its SwiftShader WebGPU adapter runs the browser test headless)
#   - Node.js + npm and the browser test's npm packages (playwright-core; no browser download)
#   - the wasm32 Rust target, wasm-bindgen-cli (the exact version in Cargo.lock) and trunk
# Runs as root, or as a user with sudo for the apt step. Safe to run again: a ready machine
# takes about a second.
#   scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TRUNK_VERSION=0.21.14 # trunk 0.22 needs a newer rustc than 1.95
RUST_MIN=1.95

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup]\033[0m %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# The wasm-bindgen CLI must equal the wasm-bindgen crate in Cargo.lock, or trunk refuses to build.
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock 2>/dev/null || true)
WASM_BINDGEN_VERSION=${WASM_BINDGEN_VERSION:-0.2.130}

# --- Debian packages ---------------------------------------------------------------------
need_apt=()
for pkg in mesa-vulkan-drivers libvulkan1 chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
# Node from any source will do (Debian's nodejs or NodeSource's, which bundles npm).
have node || need_apt+=(nodejs)
have npm || need_apt+=(npm)
have cc || need_apt+=(build-essential)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif have sudo; then
    SUDO=(sudo)
  else
    die "need to install ${need_apt[*]}: run this script as root or install sudo"
  fi
  say "apt-get install ${need_apt[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "Node.js 18 or newer is needed (found $(node --version))"

# --- Rust toolchain pieces ---------------------------------------------------------------
have cargo || die "no cargo: install Rust ${RUST_MIN}+ with rustup (https://rustup.rs), then run this again"
rust_version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$rust_version" | sort -V | head -1)" != "$RUST_MIN" ]; then
  die "rustc $rust_version is older than $RUST_MIN: run \`rustup update\`"
fi

if have rustup; then
  if ! rustup target list --installed | grep -qx 'wasm32-unknown-unknown'; then
    say "rustup target add wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown
  fi
elif [ ! -d "$(rustc --print sysroot)/lib/rustlib/wasm32-unknown-unknown" ]; then
  die "the wasm32-unknown-unknown Rust target is missing and rustup is not available to add it"
fi

# Installed tools go to cargo's install root (~/.cargo/bin), outside the clone.
if ! wasm-bindgen --version 2>/dev/null | grep -q " ${WASM_BINDGEN_VERSION}\$"; then
  say "cargo install wasm-bindgen-cli ${WASM_BINDGEN_VERSION} (a few minutes)"
  cargo install wasm-bindgen-cli --version "=${WASM_BINDGEN_VERSION}" --force
fi

if ! trunk --version 2>/dev/null | grep -q " ${TRUNK_VERSION}\$"; then
  say "cargo install trunk ${TRUNK_VERSION} (about ten minutes)"
  cargo install trunk --version "=${TRUNK_VERSION}" --locked --force
fi

# --- npm packages for the browser test -----------------------------------------------------
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 # the system Chromium is used, never a download
want_pw=$(node -p 'require("./tests/browser/package.json").devDependencies["playwright-core"]')
have_pw=$(node -p 'try { require("./tests/browser/node_modules/playwright-core/package.json").version } catch { "" }')
if [ "$want_pw" != "$have_pw" ]; then
  say "npm ci (tests/browser: playwright-core ${want_pw})"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

say "ready"
