#!/usr/bin/env bash
# Runs Brume's whole test suite: unit, property, integration and end-to-end tests (the
# end-to-end tests start their own mosquitto, hub and agent processes on free ports), after
# building the example WASM modules (`cargo xtask build-modules`), whose native unit tests
# (a separate workspace, modules/examples) run at the end.
# Installs missing system packages first. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --workspace --all-targets --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The wasm host's tests load these modules from target/modules/. Same task as
# `cargo xtask build-modules`, run with the xtask binary the build above just made.
cargo run --locked --quiet --package xtask -- build-modules 2>&1 | tee "$log" || status=$?
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
# The example modules' native tests; extra args are for the main workspace only.
(cd modules/examples && cargo test --locked --no-fail-fast) 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
