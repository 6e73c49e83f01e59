#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build Portrait:
# libclang (bindgen, for the rocksdb crate) and a C++ compiler.
set -euo pipefail

need=()
# bindgen needs libclang itself and clang's headers (libclang-dev brings both);
# the base image's libclang-cpp is not enough.
if command -v dpkg >/dev/null; then
  dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
elif ! compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null; then
  need+=(libclang-dev)
fi
command -v c++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup.rs" >&2; exit 1; }
