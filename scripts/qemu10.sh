#!/usr/bin/env bash
# QEMU 10.0 from Debian's bookworm-backports, unpacked into a private directory beside the
# system's QEMU 7.2, for the cross-version tests (a fleet migrates to upgrade its hosts).
#
#   scripts/qemu10.sh          # prints the binary's path; fetches it only if missing
#
# It never touches the system's packages or apt state: a private sources list (the
# backports suite, and bookworm for ipxe-qemu) with private lists and cache, then
# `apt-get download` + `dpkg -x`. The mirror is the one this machine's own apt sources
# name. Beside the binary, `usr/bin/qemu-bundle -> ../..` makes QEMU find its modules,
# data and firmware inside its own tree (without it, it loads the system's 7.2 modules and
# aborts). ipxe-qemu is bookworm's (option ROMs migrate as RAM blocks: their sizes must be
# the same on both sides), seabios the backports one.
#
# Cached in $VMFERRY_QEMU10_DIR (default .cache/qemu10 in the repository).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${VMFERRY_QEMU10_DIR:-$ROOT/.cache/qemu10}
VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"
BIN=$DEST/usr/bin/qemu-system-x86_64

die() {
    echo "qemu10: error: $*" >&2
    exit 1
}

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "version 10\.0\."; then
    echo "$BIN"
    exit 0
fi

# The Debian mirror of this machine's own apt sources (deb822 .sources or one-line lists).
mirror=$(
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
            /^URIs:/ { uri = $2 }
            /^Suites:/ { if ($0 ~ /[ \t]bookworm([ \t]|$)/ && uri != "") { print uri; exit } }'
        grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' | awk '$3 == "bookworm" { print $2; exit }'
    } | head -n1 || true
)
[ -n "$mirror" ] || die "no Debian bookworm mirror in /etc/apt/sources.list{,.d}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
printf 'deb %s bookworm-backports main\ndeb %s bookworm main\n' "$mirror" "$mirror" >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "APT::Sandbox::User=root"
)
echo "qemu10: fetching QEMU $VERSION from $mirror (bookworm-backports)" >&2
apt-get -qq "${apt_opts[@]}" update >/dev/null || die "apt-get update of the private sources failed"
(
    cd "$work/debs"
    apt-get -qq "${apt_opts[@]}" download \
        "qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" "qemu-system-data=$VERSION" \
        seabios/bookworm-backports ipxe-qemu/bookworm >/dev/null
) || die "apt-get download failed"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$work/root" || die "dpkg -x $deb failed"
done
ln -s ../.. "$work/root/usr/bin/qemu-bundle"
"$work/root/usr/bin/qemu-system-x86_64" --version | grep -q "version 10\.0\." ||
    die "the unpacked QEMU does not run: $("$work/root/usr/bin/qemu-system-x86_64" --version 2>&1 | head -n2)"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$work/root" "$DEST"
echo "$BIN"
