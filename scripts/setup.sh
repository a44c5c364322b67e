#!/usr/bin/env bash
# Installs what dsync's build, tests, demo and benchmarks need on a fresh
# Debian machine with a Rust toolchain. Safe to run again: it installs only
# what is missing. With --bench it also installs the peers that
# scripts/bench-backup measures dsync against (borg, restic) and bc.
set -euo pipefail

pkgs=(e2fsprogs qemu-utils fuse3 python3 time rdiff-backup rsync attr acl xfsprogs openssh-server openssh-client)
if [ "${1:-}" = --bench ]; then
  pkgs+=(borgbackup restic bc)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
# The S3 server the tests start (tests/e2e/s3.rs): a real hyper S3 server,
# file-backed. 0.14.1: later ones need a newer Rust than this toolchain.
if ! command -v s3s-fs >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  echo "setup: installing s3s-fs (cargo install)" >&2
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
