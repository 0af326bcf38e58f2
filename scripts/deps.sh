#!/usr/bin/env bash
# Installs what Brume's demo and tests need when it is missing: mosquitto (the MQTT broker
# the tests start privately on free ports) and the PostgreSQL server binaries (the hub's
# postgres tests initdb private servers), and Chromium with its WebDriver (the dashboard
# tests drive a headless browser). Debian/Ubuntu; needs root or sudo for apt-get.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1)" ] || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
# The WASM modules (modules/examples, `cargo xtask build-modules`) build for this target.
if ! rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null | xargs test -d 2>/dev/null; then
  command -v rustup >/dev/null 2>&1 || { echo "the Rust target wasm32-unknown-unknown is missing and rustup is not installed" >&2; exit 1; }
  echo "installing the Rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi
# Formatting and lints are checked by scripts/test.sh.
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || { echo "cargo $c is missing and rustup is not installed" >&2; exit 1; }
    echo "installing the Rust component $c"
    rustup component add "$c"
  fi
done
