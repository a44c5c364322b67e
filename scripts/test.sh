#!/usr/bin/env bash
# The test command: set up a fresh machine, then run every test (unit,
# property, differential, end-to-end) in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --release
