#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine, as root and without a terminal (CI):
# the Rust components the checks use (rustfmt, clippy), the system packages vmferry and
# its end-to-end tests use, then the test guest image and QEMU 10.0 (cross-version tests). Installs only what is missing and
# runs `apt-get update` at most once.
#
#   scripts/setup.sh               # everything
#   scripts/setup.sh --toolchain   # only rustfmt and clippy (quick: scripts/test.sh runs
#                                  # the format and lint checks before the slow set-up)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

say() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}

# rustfmt and clippy: `cargo fmt`/`cargo clippy` fail (even as rustup's proxies) when the
# component is missing, so asking for their versions is the check; rustup only runs then.
toolchain() {
    if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
        say "rustfmt and clippy present"
        return
    fi
    command -v rustup >/dev/null ||
        die "cargo fmt or cargo clippy is missing and there is no rustup to add them"
    say "rustup component add rustfmt clippy"
    rustup component add rustfmt clippy || die "rustup component add rustfmt clippy failed"
    cargo fmt --version >/dev/null && cargo clippy --version >/dev/null ||
        die "rustfmt or clippy still missing after rustup component add"
}

case "${1:-}" in
"") ;;
--toolchain)
    toolchain
    exit 0
    ;;
*) die "unknown argument $1 (usage: setup.sh [--toolchain])" ;;
esac

toolchain

command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
    die "this script needs a Debian-based system (apt-get and dpkg)"

# package  command it provides (a package counts as present if either check passes)
WANT=(
    "qemu-system-x86 qemu-system-x86_64"
    "qemu-utils qemu-img"
    "nftables nft"
    "iproute2 ip"
    "tcpdump tcpdump"
    "socat socat"
    "python3 python3"
    "systemd systemd-analyze"
)
need=()
for entry in "${WANT[@]}"; do
    read -r pkg cmd <<<"$entry"
    if ! command -v "$cmd" >/dev/null && ! dpkg -s "$pkg" >/dev/null 2>&1; then
        need+=("$pkg")
    fi
done

if [ ${#need[@]} -eq 0 ]; then
    say "system packages present"
else
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}; run as root to install them"
    # Fresh images often ship without package lists; refresh only then or when an
    # install fails on stale lists.
    updated=no
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        say "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        updated=yes
    fi
    say "installing ${need[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
        [ "$updated" = no ] || die "apt-get install ${need[*]} failed"
        say "install failed; apt-get update and retry"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
            die "apt-get install ${need[*]} failed"
    fi
fi

for cmd in qemu-system-x86_64 qemu-img nft ip tcpdump socat python3 systemd-analyze; do
    command -v "$cmd" >/dev/null || die "$cmd still missing after installing packages"
done

say "guest image"
"$ROOT/scripts/guest-image.sh" || die "building the guest image failed"

say "QEMU 10.0 for the cross-version tests"
"$ROOT/scripts/qemu10.sh" >/dev/null || die "fetching QEMU 10.0 (scripts/qemu10.sh) failed"
say "machine ready"
