#!/usr/bin/env bash
# Builds the tiny test guest: Debian 12's kernel and a busybox initramfs whose /init keeps
# dirtying 16 MiB of memory and prints "vmferry-heartbeat N" on ttyS0 twice a second.
#
# Output: $VMFERRY_CACHE (default <repo>/.cache/guest)/{vmlinuz,initramfs.img,stamp}.
# Idempotent: does nothing when both files exist and the stamp (a hash of this script and
# mkinitramfs.py) matches, so editing either rebuilds the image. Installs nothing: the
# packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
# Boot it with: -kernel vmlinuz -initrd initramfs.img -append "console=ttyS0 quiet panic=-1 no_timer_check"
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${VMFERRY_CACHE:-$ROOT/.cache/guest}

die() {
    echo "guest-image: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb python3 sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh on Debian 12)"
done

STAMP=$(cat "$ROOT/scripts/guest-image.sh" "$ROOT/scripts/mkinitramfs.py" | sha256sum | cut -c1-16)
ready() {
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ] &&
        [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]
}
ready && exit 0

# One builder at a time (parallel test binaries, setup.sh); the others wait, then find
# the image ready.
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
ready && exit 0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

updated=no
apt_update() {
    [ "$updated" = no ] || return 1
    [ "$(id -u)" = 0 ] || return 1
    echo "guest-image: apt-get update"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    updated=yes
}

# The kernel the metapackage currently points to, e.g. linux-image-6.1.0-NN-amd64.
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ] && apt_update; then
    KPKG=$(kernel_package)
fi
[ -n "$KPKG" ] || die "cannot find Debian's kernel package (is this Debian 12 with apt lists?)"

# Downloads the first of the given packages that the mirror has, into the current dir.
# The sandbox user is root because _apt may not write into our private temporary dir.
download_one() {
    local p
    for p in "$@"; do
        if apt-get download -qq -o APT::Sandbox::User=root "$p" >/dev/null 2>&1; then
            echo "guest-image: downloaded $p"
            return 0
        fi
    done
    return 1
}

mkdir debs x
cd debs
if ! download_one "$KPKG" "$KPKG-unsigned"; then
    # Stale lists name a kernel the mirror no longer has: refresh once, ask again.
    apt_update || die "cannot download $KPKG"
    KPKG=$(kernel_package)
    download_one "$KPKG" "$KPKG-unsigned" || die "cannot download $KPKG"
fi
if ! download_one busybox-static; then
    apt_update || die "cannot download busybox-static"
    download_one busybox-static || die "cannot download busybox-static"
fi
cd ..
for d in debs/*.deb; do dpkg-deb -x "$d" x; done

set -- x/boot/vmlinuz-*
[ -f "$1" ] || die "no kernel in the downloaded package"
[ -x x/bin/busybox ] || die "no busybox in busybox-static"

cp "$1" "$OUT/vmlinuz.new"
python3 "$ROOT/scripts/mkinitramfs.py" x/bin/busybox "$OUT/initramfs.img.new" x/lib/modules
mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$OUT/initramfs.img.new" "$OUT/initramfs.img"
echo "$STAMP" >"$OUT/stamp"
echo "guest-image: $OUT/vmlinuz ($(basename "$1")) and $OUT/initramfs.img" \
    "($(stat -c %s "$OUT/initramfs.img") bytes) ready"
