#!/usr/bin/env bash
# Idempotent machine set-up for a fresh Debian 12 machine, as root: the system packages
# vmferry and its tests use, and the test guest image. Skips what is already there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v tcpdump >/dev/null || need+=(tcpdump)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to install ${need[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$ROOT/scripts/guest-image.sh"
echo "setup: machine ready"
