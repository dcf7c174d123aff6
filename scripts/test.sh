#!/usr/bin/env bash
# Sets up this machine (packages, guest image, build), runs the whole test suite, then
# fuzzes the decoders of peer input for a bounded time (FUZZ_SECONDS each, default 20).
# Needs root: the end-to-end tests make network namespaces and run tcpdump.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== cargo test (all crates, end-to-end tests with real QEMU, TLS and namespaces)"
cargo test --workspace --locked -- --test-threads=2
echo "== fuzzing every decoder of peer input, ${FUZZ_SECONDS:-20} s each (scripts/fuzz.sh)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} ./scripts/fuzz.sh
