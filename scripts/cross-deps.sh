#!/usr/bin/env bash
# Installs what cross-building and emulating Brume's agent needs when it is missing: the
# Debian cross toolchains, qemu-user (tests run the ARM binaries under it) and the Rust
# targets. Usage: scripts/cross-deps.sh [aarch64] [armv7] (none: both). Debian/Ubuntu;
# needs root or sudo for apt-get.
set -euo pipefail

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(aarch64 armv7)
need=()
rust=()
for t in "${targets[@]}"; do
  case "$t" in
    aarch64)
      command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
      [ -f /usr/aarch64-linux-gnu/include/stdio.h ] || need+=(libc6-dev-arm64-cross)
      command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
      rust+=(aarch64-unknown-linux-gnu) ;;
    armv7)
      command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need+=(gcc-arm-linux-gnueabihf)
      [ -f /usr/arm-linux-gnueabihf/include/stdio.h ] || need+=(libc6-dev-armhf-cross)
      command -v qemu-arm >/dev/null 2>&1 || need+=(qemu-user)
      rust+=(armv7-unknown-linux-gnueabihf) ;;
    x86_64) rust+=(x86_64-unknown-linux-gnu) ;;
    *) echo "unknown target $t: expected aarch64, armv7 or x86_64" >&2; exit 2 ;;
  esac
done
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg-dev)
# readelf: the package reads the glibc its binary needs; the tests check the ELF machine.
command -v readelf >/dev/null 2>&1 || need+=(binutils)

if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for r in "${rust[@]}"; do
  if ! rustc --print target-libdir --target "$r" 2>/dev/null | xargs test -d 2>/dev/null; then
    command -v rustup >/dev/null 2>&1 || { echo "the Rust target $r is missing and rustup is not installed" >&2; exit 1; }
    echo "installing the Rust target $r"
    rustup target add "$r"
  fi
done
