#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine, as root and without a terminal (CI):
# the Rust components the checks use (rustfmt, clippy), the system packages vmferry and
# its end-to-end tests use (libvirt included), then the test guest image and QEMU 10.0
# (cross-version tests). Installs only what is missing and runs `apt-get update` at most once.
#
# libvirt: the tests run their own libvirtd per test host (private /run/libvirt, /etc/libvirt,
# ...: crates/vmferry-testkit/src/libvirt/) and never use or touch the system's. When this
# script installs libvirt-daemon-system itself, it keeps the package from starting the
# system's libvirtd (a policy-rc.d for the install, if the machine has none) and disables the
# units the package enabled, so no system libvirtd, virbr0 or dnsmasq appears that nobody
# asked for. A libvirt the machine already had is left alone: the tests do not need it stopped.
#
#   scripts/setup.sh               # everything
#   scripts/setup.sh --toolchain   # only what building needs: rustfmt, clippy, and the
#                                  # libvirt headers (libvirt-dev, pkg-config) the `virt`
#                                  # crate links against (quick: scripts/test.sh runs the
#                                  # format and lint checks before the slow set-up)
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

# The `virt` crate's build links against libvirt: its headers and pkg-config file must
# be there before clippy or any build.
build_deps() {
    if command -v pkg-config >/dev/null && pkg-config --exists libvirt; then
        say "libvirt-dev and pkg-config present"
        return
    fi
    [ "$(id -u)" = 0 ] || die "libvirt-dev or pkg-config is missing; run as root to install them"
    say "installing libvirt-dev pkg-config (the build links against libvirt)"
    if ! apt-get install -y -qq --no-install-recommends libvirt-dev pkg-config >/dev/null; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends libvirt-dev pkg-config >/dev/null ||
            die "apt-get install libvirt-dev pkg-config failed"
    fi
    pkg-config --exists libvirt || die "libvirt-dev installed but pkg-config finds no libvirt"
}

case "${1:-}" in
"") ;;
--toolchain)
    toolchain
    build_deps
    exit 0
    ;;
*) die "unknown argument $1 (usage: setup.sh [--toolchain])" ;;
esac

toolchain

command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
    die "this script needs a Debian-based system (apt-get and dpkg)"

# package  command it provides (a package counts as present if either check passes;
# "-": a library package without a command, checked with dpkg only)
WANT=(
    "qemu-system-x86 qemu-system-x86_64"
    "qemu-utils qemu-img"
    "nftables nft"
    "iproute2 ip"
    "tcpdump tcpdump"
    "socat socat"
    "python3 python3"
    "systemd systemd-analyze"
    "util-linux unshare"
    "libvirt-daemon-system libvirtd"
    "libvirt-clients virsh"
    "libvirt-dev -"
    "pkg-config pkg-config"
)
missing_packages() {
    need=()
    for entry in "${WANT[@]}"; do
        read -r pkg cmd <<<"$entry"
        if { [ "$cmd" = - ] || ! command -v "$cmd" >/dev/null; } && ! dpkg -s "$pkg" >/dev/null 2>&1; then
            need+=("$pkg")
        fi
    done
}
missing_packages

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
    # The libvirt packages start libvirtd (and with it the default network: virbr0,
    # dnsmasq) unless policy-rc.d says no; the tests bring their own daemons.
    installing_libvirtd=no
    case " ${need[*]} " in *" libvirt-daemon-system "*) installing_libvirtd=yes ;; esac
    our_policy=no
    if [ "$installing_libvirtd" = yes ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        our_policy=yes
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    say "installing ${need[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
        [ "$updated" = no ] || die "apt-get install ${need[*]} failed"
        say "install failed; apt-get update and retry"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
            die "apt-get install ${need[*]} failed"
    fi
    # An install can remove a package that was there: a machine with qemu-utils from
    # bookworm-backports loses it when qemu-system-x86 7.2 comes in (their versions
    # conflict). Whatever is missing now is installed from the same suite in a second pass.
    missing_packages
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]} (removed by the install above: conflicting versions)"
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
            die "apt-get install ${need[*]} failed"
    fi
    if [ "$our_policy" = yes ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    if [ "$installing_libvirtd" = yes ]; then
        say "disabling the system libvirtd units the package enabled (the tests run their own)"
        units=(libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket
            libvirt-guests.service virtlogd.socket virtlogd-admin.socket virtlockd.socket
            virtlockd-admin.socket)
        # `disable` works offline too (no systemd running: it only removes the links);
        # `stop` only where systemd runs (an older policy-rc.d may have let them start).
        systemctl disable --quiet "${units[@]}" >/dev/null 2>&1 ||
            say "note: systemctl disable failed; the tests do not depend on it"
        if [ -d /run/systemd/system ]; then
            systemctl stop "${units[@]}" >/dev/null 2>&1 || true
        fi
    fi
fi

for cmd in qemu-system-x86_64 qemu-img nft ip tcpdump socat python3 systemd-analyze unshare \
    nsenter libvirtd virsh pkg-config; do
    command -v "$cmd" >/dev/null || die "$cmd still missing after installing packages"
done
pkg-config --exists libvirt || die "libvirt-dev installed but pkg-config finds no libvirt"

# libvirtd resolves its compiled-in QEMU user before it reads qemu.conf, so the user must
# exist even though the tests' qemu.conf runs QEMU as root. libvirt-daemon-system's
# postinst makes it; a machine where that was skipped gets it here.
if ! getent passwd libvirt-qemu >/dev/null; then
    [ "$(id -u)" = 0 ] || die "the libvirt-qemu user is missing; run as root to add it"
    say "adding the system user libvirt-qemu"
    useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
        libvirt-qemu || die "useradd libvirt-qemu failed"
fi

say "guest image"
"$ROOT/scripts/guest-image.sh" || die "building the guest image failed"

say "QEMU 10.0 for the cross-version tests"
"$ROOT/scripts/qemu10.sh" >/dev/null || die "fetching QEMU 10.0 (scripts/qemu10.sh) failed"
say "machine ready"
