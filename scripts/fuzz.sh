#!/usr/bin/env bash
# Fuzzes every decoder of peer input for a bounded time, from the committed seeds.
#
#   scripts/fuzz.sh                  # every target, FUZZ_SECONDS each
#   scripts/fuzz.sh cookie preamble  # only these
#   FUZZ_SECONDS=600 scripts/fuzz.sh control_request
#
# Environment:
#   FUZZ_SECONDS    how long each target runs (default 30)
#   FUZZ_JOBS       targets run at once, one core each (default: the number of cores)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: the decoders are safe Rust, and
#                   AddressSanitizer slows every execution; "address" to use it)
#
# Exits non-zero if any target crashes (panic, timeout, out of memory), naming it and the
# input that did it (fuzz/artifacts/<target>/). A crash is fixed, and its input kept as a
# #[test] in crates/<crate>/tests/fuzz_regressions.rs and as a seed (fuzz/make_seeds.py,
# seed-regression_*), so every later run tries it first. Reproduce one with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer, -C passes=sancov...); the
# machine has only the stable toolchain, so RUSTC_BOOTSTRAP=1 lets stable take them.
# New inputs libFuzzer finds go to fuzz/target/corpus/<target> (not committed), so a
# later run here goes on from where this one stopped; the seeds stay as committed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=${FUZZ_SECONDS:-30}
JOBS=${FUZZ_JOBS:-$(nproc)}
SANITIZER=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1

# Longest input per target: a little over the largest real message of its kind, so
# time goes to structure rather than to ever longer strings.
declare -A MAX_LEN=(
    [control_request]=8192
    [control_response]=8192
    [cookie]=4096
    [preamble]=10
    [tunnel_frame]=8192
    [tunnel_mux]=8192
    [qmp_reply]=4096
    [qmp_session]=16384
    [record_layer]=20000
)
ALL_TARGETS=(control_request control_response cookie preamble tunnel_frame tunnel_mux qmp_reply qmp_session record_layer)
if (($# > 0)); then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
for t in "${TARGETS[@]}"; do
    [[ -n ${MAX_LEN[$t]:-} ]] || { echo "fuzz.sh: unknown target $t (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

started=$(date +%s)

# --- what the build needs (each step does nothing when already there)
if ! command -v c++ >/dev/null; then
    echo "== installing a C++ compiler (libFuzzer is C++)"
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
if [[ $(cargo fuzz --version 2>/dev/null) != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

# --- the tunnel targets compile the tunnel's own config (crates/vmferry-channel/src/
# tunnel/config.rs) and link yamux themselves: refuse to fuzz another yamux than the one
# vmferry builds.
yamux_version() { sed -n '/^name = "yamux"$/{n;s/^version = "\(.*\)"$/\1/p}' "$1"; }
if [[ -f Cargo.lock && $(yamux_version ../Cargo.lock) != "$(yamux_version Cargo.lock)" ]]; then
    echo "fuzz.sh: vmferry builds yamux $(yamux_version ../Cargo.lock), the fuzz targets $(yamux_version Cargo.lock);" \
        "set the same version in fuzz/Cargo.toml (cargo update -p yamux --precise ...)" >&2
    exit 1
fi

# --- build all targets once. 16 codegen units (cargo-fuzz's default is 1): a much
# shorter build for slightly slower targets, the better trade for a short bounded run.
echo "== building fuzz targets ($(rustc --version), sanitizer $SANITIZER)"
BUILD_FLAGS=(--debug-assertions --sanitizer "$SANITIZER" --codegen-units 16)
cargo fuzz build "${BUILD_FLAGS[@]}" 2>&1 | sed '/^ *Compiling /d'
host=$(rustc -vV | sed -n 's/^host: //p')
bin=target/$host/release
for t in "${TARGETS[@]}"; do
    [[ -x $bin/$t ]] || { echo "fuzz.sh: the build made no $bin/$t" >&2; exit 1; }
done
built=$(date +%s)
echo "   built in $((built - started)) s"

# --- run: JOBS targets at a time, each on its own core for SECONDS_EACH.
logs=target/fuzz-logs
rm -rf "$logs" && mkdir -p "$logs"
touch "$logs/.start" # artifacts newer than this are this run's
run_one() {
    local t=$1 dict=()
    # Every target but the preamble and the record layer reads JSON: give it JSON's
    # tokens, the protocols' words and numbers at the integer edges (dict/json.dict).
    # Edge numbers matter: a fuzzer rarely types 4294967295 by chance.
    [[ $t == preamble || $t == record_layer ]] || dict=(-dict=dict/json.dict)
    mkdir -p "target/corpus/$t" "artifacts/$t"
    "$bin/$t" "${dict[@]}" \
        -max_total_time="$SECONDS_EACH" \
        -max_len="${MAX_LEN[$t]}" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" \
        "target/corpus/$t" "corpus/$t" >"$logs/$t.log" 2>&1
}
echo "== fuzzing ${#TARGETS[@]} targets, $SECONDS_EACH s each, $JOBS at a time"
for t in "${TARGETS[@]}"; do
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
    (
        rc=0
        run_one "$t" || rc=$?
        echo "$rc" >"$logs/$t.rc"
    ) &
done
wait

failed=()
for t in "${TARGETS[@]}"; do
    rc=$(cat "$logs/$t.rc" 2>/dev/null || echo missing)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -1 || true)
    corpus=$(find "target/corpus/$t" "corpus/$t" -type f | wc -l)
    if [[ $rc == 0 ]]; then
        printf '   ok      %-17s %10s runs  %-9s %5s inputs in corpus\n' "$t" "${runs:-?}" "${cov:-}" "$corpus"
    else
        printf '   CRASHED %-17s exit %s\n' "$t" "$rc"
        failed+=("$t")
    fi
done
echo "== done in $(($(date +%s) - started)) s (build $((built - started)) s)"

if ((${#failed[@]} > 0)); then
    for t in "${failed[@]}"; do
        echo
        echo "== $t crashed; the end of its log ($PWD/$logs/$t.log):"
        tail -40 "$logs/$t.log"
        echo "-- inputs that did it:"
        find "artifacts/$t" -type f -newer "$logs/.start" | sed 's|^|   fuzz/|'
    done
    echo
    echo "fuzz.sh: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
    exit 1
fi
