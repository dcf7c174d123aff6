#!/usr/bin/env bash
# The main job, in one command: set this machine up, then live-migrate a real, running
# Linux guest between two hosts (two network namespaces joined by a veth pair, each with
# its own vmferry daemon) over vmferry's authenticated, encrypted channel, with its local
# disk copied beside its memory, and show the guest's heartbeat (and its reads of the copied
# disk) carrying on at the destination. Needs root. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
./scripts/setup.sh
echo "== building vmferry (release)"
cargo build --release --locked -p vmferry
BIN=$ROOT/target/release/vmferry
GUEST=${VMFERRY_CACHE:-$ROOT/.cache/guest}

WORK=$(mktemp -d /tmp/vmferry-demo.XXXXXX)
A=vmferry-demo-a
B=vmferry-demo-b
IPA=10.231.250.1
IPB=10.231.250.2
cleanup() {
    for ns in $A $B; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
cleanup_stale() { for ns in $A $B; do ip netns del "$ns" 2>/dev/null || true; done; }
cleanup_stale

echo "== two hosts: network namespaces $A ($IPA) and $B ($IPB), joined by a veth pair"
ip netns add $A
ip netns add $B
ip link add vmfdemo-a type veth peer name vmfdemo-b
ip link set vmfdemo-a netns $A
ip link set vmfdemo-b netns $B
ip -n $A addr add $IPA/24 dev vmfdemo-a
ip -n $B addr add $IPB/24 dev vmfdemo-b
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set vmfdemo-a up
ip -n $B link set vmfdemo-b up

echo "== certificates: one CA, a certificate per host and one for the controller"
$BIN certs init --dir "$WORK/ca" >/dev/null
$BIN certs issue --dir "$WORK/ca" --host hosta --ip $IPA --out "$WORK/hosta" >/dev/null
$BIN certs issue --dir "$WORK/ca" --host hostb --ip $IPB --out "$WORK/hostb" >/dev/null
$BIN certs issue --dir "$WORK/ca" --host controller --out "$WORK/controller" >/dev/null

echo "== daemons: vmferry serve on $IPA:4700 and $IPB:4700"
ip netns exec $A $BIN serve --listen $IPA:4700 --state-dir "$WORK/a" --certs "$WORK/hosta" 2>"$WORK/a.log" &
ip netns exec $B $BIN serve --listen $IPB:4700 --state-dir "$WORK/b" --certs "$WORK/hostb" 2>"$WORK/b.log" &
disown -a
for s in a b; do
    for _ in $(seq 100); do [ -S "$WORK/$s/control.sock" ] && break; sleep 0.1; done
done

CTL=(--certs "$WORK/controller")
echo "== a local disk for the guest on hosta (not shared with hostb: it is copied)"
mkdir -p "$WORK/a-disks"
DISK=$WORK/a-disks/demo.raw
printf 'demo disk, made on hosta\n' >"$DISK"
truncate -s 64M "$DISK"
echo "== starting guest 'demo' on hosta (accel auto: KVM if it really runs a guest here, else TCG)"
ip netns exec $A $BIN vm start demo --daemon $IPA:4700 "${CTL[@]}" --memory 256M --cpus 1 \
    --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.img" --append "console=ttyS0 quiet panic=-1 no_timer_check" \
    --disk "$DISK"
SRC_LOG=$WORK/a/vms/demo/serial.log
DST_LOG=$WORK/b/vms/demo/serial.log
last_beat() { { grep -ao 'vmferry-heartbeat [0-9]*' "$1" 2>/dev/null || true; } | tail -1 | awk '{print $2}'; }
first_beat() { { grep -ao 'vmferry-heartbeat [0-9]*' "$1" 2>/dev/null || true; } | head -1 | awk '{print $2}'; }
for _ in $(seq 600); do
    n=$(last_beat "$SRC_LOG"); [ -n "$n" ] && [ "$n" -ge 3 ] && break; sleep 0.1
done
echo "   guest is up on hosta, heartbeat $(last_beat "$SRC_LOG")"

echo "== migrating 'demo' hosta -> hostb with its disk (the controller talks to both daemons over"
echo "   mutual TLS; the guest's disk and memory go over TLS 1.3 with per-migration pinned identities)"
ip netns exec $A $BIN migrate demo --from $IPA:4700 --to $IPB:4700 "${CTL[@]}" --copy-storage all
SRC_END=$(last_beat "$SRC_LOG")
sleep 6
echo "== after migration"
echo "   last heartbeat printed on hosta:      $SRC_END"
echo "   first heartbeat printed on hostb:     $(first_beat "$DST_LOG")"
echo "   latest heartbeat on hostb:            $(last_beat "$DST_LOG")"
echo "   VMs on hosta:"; ip netns exec $A $BIN vm list --daemon $IPA:4700 "${CTL[@]}" | sed 's/^/     /'
echo "   VMs on hostb:"; ip netns exec $B $BIN vm list --daemon $IPB:4700 "${CTL[@]}" | sed 's/^/     /'
echo "   the disk hostb made for the copy:     $(ls "$WORK/b/images")"
echo "   the guest reading its disk on hostb:  $({ grep -a 'vmferry-diskcheck' "$DST_LOG" || echo 'no check yet'; } | tail -1)"
echo "== demo done: the guest kept counting on hostb; cleaning up"
