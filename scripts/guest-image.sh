#!/usr/bin/env bash
# Builds the tiny test guest: Debian's kernel and a busybox initramfs whose init dirties
# memory and prints "vmferry-heartbeat N" on the serial console twice a second.
# Output: $VMFERRY_CACHE (default <repo>/.cache/guest)/{vmlinuz,initramfs.img}. Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${VMFERRY_CACHE:-$ROOT/.cache/guest}
STAMP="v1"
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
    exit 0
fi
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$KPKG" ]; then
    apt-get update -qq
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$KPKG" ] || { echo "guest-image: cannot find Debian's kernel package" >&2; exit 1; }
echo "guest-image: downloading $KPKG and busybox-static"
apt-get download -qq "$KPKG" busybox-static >/dev/null
mkdir x
for d in ./*.deb; do dpkg -x "$d" x; done
cp x/boot/vmlinuz-* "$OUT/vmlinuz.new"
python3 "$ROOT/scripts/mkinitramfs.py" x/bin/busybox "$OUT/initramfs.img.new"
mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$OUT/initramfs.img.new" "$OUT/initramfs.img"
echo "$STAMP" > "$OUT/stamp"
echo "guest-image: $OUT/vmlinuz and $OUT/initramfs.img ready"
