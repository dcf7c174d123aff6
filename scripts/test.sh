#!/usr/bin/env bash
# Sets up this machine (packages, guest image, build) and runs the whole test suite.
# Needs root: the end-to-end tests make network namespaces and run tcpdump.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== cargo test (all crates, end-to-end tests with real QEMU, TLS and namespaces)"
cargo test --workspace --locked -- --test-threads=2
