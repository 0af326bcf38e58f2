#!/usr/bin/env bash
# Runs Brume's whole test suite: unit, property, integration and end-to-end tests (the
# end-to-end tests start their own mosquitto, hub and agent processes on free ports), after
# building the example WASM modules (`cargo xtask build-modules`), whose native unit tests
# (a separate workspace, modules/examples) run at the end, and the agent for aarch64 and
# armv7 with its .deb packages (`cargo xtask package aarch64 armv7`), which the device
# suite runs under qemu-user; then the Prometheus integration (scripts/check-integrations.sh).
# Checks formatting and clippy lints first (`-D warnings`). Installs missing system
# packages first. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# Formatting (rustfmt.toml) and lints first: they fail in seconds, the tests in minutes.
cargo fmt --all --check
(cd modules/examples && cargo fmt --all --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
# The runtime-only agent (what devices run: no compiler) is another feature set.
cargo clippy -p edge-agent --no-default-features --locked -- -D warnings
cargo build --workspace --all-targets --locked
log=$(mktemp)
# Tests that cannot run here (e.g. the disk-full test without root) append a line to this
# file (brume_e2e::skip); they are counted as skipped below. BRUME_REQUIRE_ALL=1 (set by
# .ci/run) makes them fail instead.
export BRUME_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$BRUME_SKIP_LOG"' EXIT
status=0
# The wasm host's tests load these modules from target/modules/. Same task as
# `cargo xtask build-modules`, run with the xtask binary the build above just made.
cargo run --locked --quiet --package xtask -- build-modules 2>&1 | tee "$log" || status=$?
# The device suite (tests/tests/device.rs) runs the agent as shipped to ARM boards under
# qemu-user, and checks the .deb packages: build both (cross toolchains and qemu are
# installed when missing). BRUME_SKIP_CROSS=1 skips this; the device tests then say so.
if [ "${BRUME_SKIP_CROSS:-}" != 1 ]; then
  cargo run --locked --quiet --package xtask -- package aarch64 armv7 2>&1 | tee -a "$log" || status=$?
fi
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
# The Prometheus scrape config and alert rules: promtool's checks and the rules' unit tests
# (integrations/prometheus/brume-alerts.test.yml), and every metric they name exists.
./scripts/check-integrations.sh 2>&1 | tee -a "$log" || status=$?
# Licences, banned crates, sources and (when the database is reachable) advisories of
# every dependency (deny.toml).
./scripts/check-supply-chain.sh 2>&1 | tee -a "$log" || status=$?
# Every network, sensor and module decoder under libFuzzer for FUZZ_SECONDS each
# (fuzz/fuzz_targets, corpus in fuzz/corpus).
./scripts/fuzz.sh 2>&1 | tee -a "$log" || status=$?
# The example modules' native tests; extra args are for the main workspace only.
(cd modules/examples && cargo test --locked --no-fail-fast) 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run, summed over every test binary. A skipped test also
# counts as passed in cargo's own tally, so it is subtracted there.
skipped=$(wc -l < "$BRUME_SKIP_LOG")
if [ "$skipped" -gt 0 ]; then
  echo "skipped tests (they returned without checking anything):"
  cat "$BRUME_SKIP_LOG"
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
