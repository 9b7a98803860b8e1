#!/usr/bin/env bash
# Runs every fuzz target in turn (or those named), at low priority, until RUNS executions
# (10 million by default) or SECONDS_PER_TARGET seconds each, growing fuzz/corpus/<target> from
# it and fuzz/seeds/<target> (python3 fuzz/seeds.py writes those). Logs, with the execution
# counts, go to fuzz/logs/.
#   fuzz/run.sh [target ...]          SECONDS_PER_TARGET=600 by default
#   RUNS=2500000 fuzz/run.sh tokenizer  the rest of a run that stopped short of 10 million
#   SANITIZER=none fuzz/run.sh        without AddressSanitizer (10-25x faster; the parsers have
#                                     no `unsafe`, so panics, timeouts and memory blow-ups are
#                                     what there is to find); a separate CARGO_TARGET_DIR keeps
#                                     both builds
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loralab/fuzz-target}"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors_header lora_parse model_config tokenizer png_parameters train_image)
mkdir -p "$here/logs"
[ -d "$here/seeds" ] || python3 "$here/seeds.py"
cd "$here"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
  nice -n 19 cargo +nightly fuzz run -O ${SANITIZER:+-s "$SANITIZER"} "$t" "corpus/$t" "seeds/$t" -- \
    -runs="${RUNS:-10000000}" -max_total_time="${SECONDS_PER_TARGET:-600}" -rss_limit_mb=2048 -timeout=10 \
    -max_len=16384 -reload=0 -print_final_stats=1 -artifact_prefix="artifacts/$t/" 2>&1 | tee "logs/$t.log" | grep -E "^#[0-9]+.*(pulse|DONE)|stat::|ERROR|panicked" || true
done
