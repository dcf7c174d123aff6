#!/usr/bin/env python3
"""Writes the seed corpus: corpus/<target>/seed-*, a few small valid inputs per target.

Run from anywhere after a change to the wire format; then check that each seed still
decodes (scripts/fuzz.sh prints each target's coverage; a seed that no longer decodes
shows as lower coverage). Seeds are real messages as vmferry, QEMU and yamux send them.
"""
import json, os, struct
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
def frame(obj):
    b = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(b)) + b
def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    if isinstance(data, str): data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f: f.write(data)

mid = "0123456789abcdef0123456789abcdef"
spec = {"name": "guest-1", "memory_mib": 256, "cpus": 2, "kernel": "/var/lib/vmferry/vmlinuz",
        "initrd": "/var/lib/vmferry/initrd.img", "append": "console=ttyS0",
        "disks": ["/srv/shared/guest-1.qcow2"], "accel": "kvm"}
opts = {"multifd": 4, "max_bandwidth": 0, "data_auth": {"mode": "pinned"},
        "downtime_limit_ms": 300, "transport": "auto"}
cookie = {"migration": mid, "options": opts, "vm": spec, "source_running": True,
          "source_fingerprint": "sha256:" + "ab" * 32,
          "destination_fingerprint": "sha256:" + "cd" * 32,
          "data_address": "192.0.2.2:4701", "source_data_address": "192.0.2.1:4701",
          "destination_control_address": "192.0.2.2:4700", "transport": "direct",
          "transport_notes": ["reverse: not tried"]}
cookie_x509 = dict(cookie, options=dict(opts, data_auth={"mode": "x509", "tls_hostname": "hostb"},
                   multifd=0, transport=None), vm=None, transport=None, transport_notes=[])

# control_request: what a controller sends a daemon.
reqs = {
 "ping": {"id": 1, "op": "ping"},
 "auth": {"id": 2, "op": "auth", "scheme": "scram-sha-256", "message": "n,,n=ops,r=rOprNGfwEbeRWgbNEkqO"},
 "vm_start": {"id": 3, "op": "vm_start", "spec": spec},
 "vm_stop": {"id": 4, "op": "vm_stop", "name": "guest-1"},
 "begin": {"id": 5, "op": "begin", "migration": mid, "vm": {"kind": "managed", "name": "guest-1"}, "options": opts},
 "prepare": {"id": 6, "op": "prepare", "cookie": cookie, "vm": {"kind": "attached", "qmp": "/run/qemu/g1.qmp"}},
 "connect": {"id": 7, "op": "connect", "cookie": cookie_x509, "transport": "reverse", "timeout_ms": 2000},
 "perform": {"id": 8, "op": "perform", "cookie": cookie},
 "status": {"id": 9, "op": "status", "migration": mid, "wait_ms": 1000},
 "finish": {"id": 10, "op": "finish", "migration": mid},
 "confirm": {"id": 11, "op": "confirm", "migration": mid, "success": True},
 "abort": {"id": 12, "op": "abort", "migration": mid, "reason": "source failed"},
}
for k, v in reqs.items():
    put("control_request", k, frame(v))
put("control_request", "session", frame(reqs["ping"]) + frame({"id": 2, "op": "vm_list"})
    + frame({"id": 3, "op": "migration_list"}) + frame(reqs["status"]))

# control_response: what a daemon sends back (hello first).
status = {"qemu_status": "active", "finished": False, "ram_total": 1073741824,
          "ram_transferred": 52428800, "ram_remaining": 1021313024, "mbps": 2345.5,
          "channel_bytes": 52500000, "streams": 5, "total_time_ms": 1200, "downtime_ms": None,
          "transport": "direct", "transport_notes": ["reverse: not tried"], "error": None}
vminfo = {"spec": spec, "state": "running", "pid": 4242, "serial_log": "/var/lib/vmferry/guest-1.log",
          "accel_reason": "kvm: /dev/kvm is usable"}
resps = {
 "hello": {"version": 1, "agent": "vmferry 0.1.0 (daemon)", "identity": "ops (admin)"},
 "hello_auth": {"version": 1, "agent": "vmferry 0.1.0 (daemon)", "auth": ["scram-sha-256"]},
 "pong": {"id": 1, "reply": "pong", "host": "hosta"},
 "done": {"id": 2, "reply": "done"},
 "vm": {"id": 3, "reply": "vm", "vm": vminfo},
 "vms": {"id": 4, "reply": "vms", "vms": [vminfo]},
 "cookie": {"id": 5, "reply": "cookie", "cookie": cookie},
 "status": {"id": 6, "reply": "status", "status": status},
 "migrations": {"id": 7, "reply": "migrations", "migrations": [
     {"migration": mid, "role": "source", "vm": "guest-1", "status": dict(status, qemu_status="completed", finished=True, downtime_ms=12)}]},
 "auth": {"id": 8, "reply": "auth", "message": "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"},
 "error": {"id": 9, "reply": "error", "error": {"kind": "not_found", "message": "no VM named guest-2"}},
}
for k, v in resps.items():
    put("control_response", k, frame(v))
put("control_response", "session", frame(resps["hello"]) + frame(resps["pong"]) + frame(resps["cookie"]) + frame(resps["error"]))

# cookie: a cookie, a VM spec, names.
put("cookie", "cookie", json.dumps(cookie))
put("cookie", "cookie_x509", json.dumps(cookie_x509))
put("cookie", "vm_spec", json.dumps(spec))
put("cookie", "vm_spec_minimal", json.dumps({"name": "g1", "memory_mib": 16, "cpus": 1}))
put("cookie", "vm_name", "guest-1.prod_a")
put("cookie", "migration_id", mid)
# Regression (crates/vmferry-proto/tests/fuzz_regressions.rs): streams() overflowed.
put("cookie", "regression_huge_multifd",
    '{"migration":"0123abcd","options":{"multifd":4294967295},"source_running":false}')

# preamble: VMF2, transport code, reserved, stream, streams (big-endian).
def pre(t, k, n): return b"VMF2" + bytes([t, 0]) + struct.pack(">HH", k, n)
put("preamble", "direct_main", pre(1, 0, 1))
put("preamble", "reverse_multifd", pre(2, 3, 5))
put("preamble", "tunnel", pre(3, 0, 65))

# tunnel_frame: the tunnel's control frames (crates/vmferry-proto/src/tunnel_frame.rs, enum
# Frame): length-prefixed JSON, hello first.
hello = frame({"hello": {"version": 1}})
msg = frame({"message": {"op": "ready", "streams": 5}})
put("tunnel_frame", "hello", hello)
put("tunnel_frame", "session", hello + msg + frame({"end": {"stream": 0, "bytes": 1073741824}})
    + frame({"refused": {"stream": 2, "cause": "no local socket within 30s"}})
    + frame({"failed": {"stream": 1, "cause": "QEMU closed its socket"}})
    + frame({"message": [None, True, -1, 1.5e-3, "x", {"nested": [[]]}]}))

# qmp_reply: return values of query-migrate / query-status, and a greeting's version.
qm_completed = {"blocked": False, "expected-downtime": 0, "status": "completed", "setup-time": 0,
    "total-time": 9, "downtime": 3, "ram": {"total": 1073741824, "postcopy-requests": 0,
    "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 0, "downtime-bytes": 4096,
    "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 0, "transferred": 1069,
    "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 1000, "duplicate": 262144,
    "dirty-pages-rate": 0, "skipped": 0, "normal-bytes": 0, "normal": 0}}
qm_active = {"status": "active", "setup-time": 2, "total-time": 7, "expected-downtime": 300,
    "cpu-throttle-percentage": 20, "ram": {"transferred": 10, "total": 100, "remaining": 90,
    "mbps": 1234.75, "dirty-sync-count": 3}, "disk": {"transferred": 1, "total": 2, "remaining": 1}}
qm_failed = {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}
put("qmp_reply", "query_migrate_completed", json.dumps(qm_completed))
put("qmp_reply", "query_migrate_active", json.dumps(qm_active))
put("qmp_reply", "query_migrate_failed", json.dumps(qm_failed))
put("qmp_reply", "query_migrate_empty", "{}")
put("qmp_reply", "query_status", json.dumps({"status": "running", "singlestep": False, "running": True}))
put("qmp_reply", "version", json.dumps({"micro": 22, "minor": 2, "major": 7, "package": "Debian 1:7.2+dfsg-7"}))

# qmp_session: what QEMU sends down the QMP socket, one object per line.
def lines(*objs): return b"".join(json.dumps(o).encode() + b"\r\n" for o in objs)
greeting = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}
put("qmp_session", "happy", lines(greeting, {"return": {}, "id": 1},
    {"return": {"status": "running", "singlestep": False, "running": True}, "id": 2},
    {"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "MIGRATION", "data": {"status": "setup"}},
    {"return": qm_active, "id": 3},
    {"timestamp": {"seconds": 1700000001, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "completed"}},
    {"return": {"announce-initial": 50, "max-bandwidth": 134217728, "multifd-channels": 2}, "id": 4},
    {"return": {}, "id": 5},
    {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}}))
put("qmp_session", "errors", lines(greeting, {"return": {}},
    {"return": {"status": "stale", "running": True}, "id": 999},
    {"id": 2, "error": {"class": "GenericError", "desc": "not now"}},
    {"return": qm_failed, "id": 3},
    {"event": "STOP"},
    {"id": 4, "error": {"class": "CommandNotFound", "desc": "The command query-migrate-parameters has not been found"}}))
put("qmp_session", "greeting_only", lines(greeting))

# tunnel_mux: yamux frames as the source's end sends them (12-byte header: version 0,
# type 0 data / 1 window update / 2 ping / 3 go away, flags SYN 1 ACK 2 FIN 4 RST 8,
# stream id, length). Stream 1 is the control stream; every other stream starts with
# its index as a big-endian u16.
def yamux(typ, flags, sid, body=b"", length=None):
    return struct.pack(">BBHII", 0, typ, flags, sid, len(body) if length is None else length) + body
put("tunnel_mux", "control_then_streams",
    yamux(1, 1, 1, length=0) + yamux(0, 0, 1, hello + msg)
    + yamux(0, 1, 3, struct.pack(">H", 0) + b"QEVM\x00\x00\x00\x03" + b"\x00" * 32)
    + yamux(0, 1, 5, struct.pack(">H", 1) + b"multifd")
    + yamux(2, 1, 0, length=7) + yamux(1, 0, 3, length=262144)
    + yamux(0, 0, 1, frame({"end": {"stream": 0, "bytes": 42}}))
    + yamux(0, 4, 3) + yamux(0, 4, 5) + yamux(0, 4, 1))
put("tunnel_mux", "go_away", yamux(0, 1, 1, hello) + yamux(3, 0, 0, length=0))
put("tunnel_mux", "reset", yamux(1, 1, 1, length=1024) + yamux(0, 8, 1))
# Regression: a window update that opens a stream with u32::MAX credit overflowed in
# yamux 0.13 (fixed in 0.14: the connection is refused with a protocol error).
put("tunnel_mux", "regression_syn_window_overflow", yamux(1, 1, 1, length=0xFFFFFFFF))

# record_layer: first byte 1 = pieces [content type][length][bytes] the target seals with
# its key (what the peer can send); 0 = raw bytes from TCP (what anyone on the path can).
def rec(*pieces): return b"\x01" + b"".join(bytes([t, len(b)]) + b for t, b in pieces)
put("record_layer", "data", rec((23, b"hello")))
put("record_layer", "key_update", rec((22, bytes([24, 0, 0, 1, 0])), (23, b"after")))
put("record_layer", "key_update_requested", rec((22, bytes([24, 0, 0, 1, 1])), (23, b"abc")))
put("record_layer", "ticket", rec((22, bytes([4, 0, 0, 4, 0, 0, 0, 0])), (23, b"x")))
put("record_layer", "close_notify", rec((23, b"last"), (21, bytes([1, 0]))))
put("record_layer", "fatal_alert", rec((21, bytes([2, 40]))))
put("record_layer", "raw_unauthentic", b"\x00" + bytes([23, 3, 3, 0, 22]) + bytes(22))

