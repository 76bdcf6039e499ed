#!/usr/bin/env bash
# The test command: set up what is missing, then run every test of the workspace
# (unit tests, and integration tests that run real servers under assure-vmm on /dev/kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --workspace --no-fail-fast "$@"
