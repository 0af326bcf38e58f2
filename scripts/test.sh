#!/usr/bin/env bash
# Runs Brume's whole test suite: unit, property, integration and end-to-end tests (the
# end-to-end tests start their own mosquitto, hub and agent processes on free ports).
# Installs missing system packages first. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# The mosquitto service the distribution starts is not used by the tests; they start their own.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast "$@"
