#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): licences, banned crates (OpenSSL,
# aws-lc), sources (crates.io only) and duplicate versions (reported), then RustSec
# advisories when the advisory database can be fetched from GitHub; where only the
# package registries are reachable that check is skipped with a visible line.
# Installs cargo-deny (from crates.io, compiled: a few minutes) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DENY_VERSION=0.20.2

if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "installing: cargo-deny $DENY_VERSION"
  cargo install --locked --quiet "cargo-deny@$DENY_VERSION"
fi

cargo deny --locked check --hide-inclusion-graph bans licenses sources

if timeout 20 git ls-remote -q https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny --locked check --hide-inclusion-graph advisories
else
  echo "SKIPPED supply-chain advisories: the RustSec database (github.com/rustsec/advisory-db) cannot be fetched from here; run 'cargo deny check advisories' where it can"
fi
