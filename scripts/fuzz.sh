#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of every decoder that faces the
# network, a sensor or a module: fuzz/fuzz_targets/. Each target runs for FUZZ_SECONDS
# (30 by default) from the committed corpus (fuzz/corpus/<target>); new inputs go to a
# temporary directory, so the committed corpus only changes when someone merges them in
# (`cargo fuzz cmin`). A crash fails the run and leaves the input in
# fuzz/artifacts/<target>/ (reproduce: cargo fuzz run --sanitizer none -O <target> <file>).
#
# `--sanitizer none`: AddressSanitizer needs a nightly toolchain, and the fuzzed crates
# have no unsafe code (the workspace denies it), so libFuzzer's coverage and Rust's own
# checks (debug assertions, overflow checks, panics) are what find bugs. Installs
# cargo-fuzz from crates.io when missing (under a minute).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-30}

# libFuzzer itself is C++ (built by libfuzzer-sys).
if ! command -v c++ >/dev/null 2>&1; then
  echo "installing: g++ (libFuzzer is C++)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends g++
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "$FUZZ_VERSION"; then
  echo "installing: cargo-fuzz $FUZZ_VERSION"
  cargo install --locked --quiet "cargo-fuzz@$FUZZ_VERSION"
fi

cargo fuzz build --sanitizer none -O
status=0
for target in $(cargo fuzz list); do
  new=$(mktemp -d)
  if cargo fuzz run --sanitizer none -O "$target" "$new" "corpus/$target" -- \
      -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 >"$new.log" 2>&1; then
    echo "fuzz $target: ok, $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$new.log" | grep -o '[0-9]*$') runs in ${seconds} s, $(ls "$new" | wc -l) new inputs"
  else
    echo "fuzz $target: FAILED"
    tail -40 "$new.log"
    status=1
  fi
  rm -rf "$new" "$new.log"
done
exit "$status"
