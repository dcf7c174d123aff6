#!/usr/bin/env bash
# Checks formatting and lints, sets up this machine (packages, guest image), runs the
# whole test suite, then fuzzes the decoders of peer input for a bounded time
# (FUZZ_SECONDS each, default 20). Stops at the first step that fails, saying which.
# Needs root: the end-to-end tests make network namespaces and run tcpdump; they fail,
# never skip, where they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "test: FAILED: $*" >&2
    exit 1
}

# The checks come first: they take seconds (fmt) or one build (clippy), while the set-up
# may build a guest image, and the tests take minutes.
./scripts/setup.sh --toolchain
echo "== cargo fmt --check (every crate)"
cargo fmt --all -- --check ||
    fail "code is not formatted as rustfmt would (diff above); run 'cargo fmt --all'"
echo "== cargo clippy (every crate and target, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings ||
    fail "clippy found problems (above); fix them, warnings included"

./scripts/setup.sh
echo "== cargo test (all crates, end-to-end tests with real QEMU, TLS and namespaces)"
cargo test --workspace --locked -- --test-threads=2 ||
    fail "tests failed (see the failures listed above)"
echo "== fuzzing every decoder of peer input, ${FUZZ_SECONDS:-20} s each (scripts/fuzz.sh)"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} ./scripts/fuzz.sh || fail "fuzzing found a crash (above)"
echo "test: all checks, tests and fuzz runs passed"
