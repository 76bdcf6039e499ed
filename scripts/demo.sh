#!/usr/bin/env bash
# Set up, then run real servers under assure-vmm: Debian's lighttpd from its image (served to
# curl, inspected through the control socket, stopped with SIGTERM, with per-syscall
# statistics), Debian's redis checkpointed, changed and rolled back, then bugsrv (a static C HTTP server with real bug classes): some requests, then
# one that dereferences NULL, and the crash event assure-vmm reports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ROOT=$(mktemp -d); trap 'rm -rf "$ROOT"; kill "${VMM_PID:-}" 2>/dev/null || true' EXIT

echo "== Debian's lighttpd from images/out/lighttpd under assure-vmm (guest port 8080 -> 18080)"
target/debug/assure-vmm run --image lighttpd --port 8080=18080 --control "$ROOT/ctl" --stats >"$ROOT/lighttpd.log" 2>&1 &
VMM_PID=$!
for _ in $(seq 200); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.05; done
echo "-- GET /"; curl -s http://127.0.0.1:18080/ | head -5
echo "-- 200 more requests"; for _ in $(seq 200); do curl -s -o /dev/null http://127.0.0.1:18080/; done
echo "-- assure-vmm ctl status"; target/debug/assure-vmm ctl "$ROOT/ctl" status
echo "-- SIGTERM to assure-vmm: delivered to lighttpd, which shuts down"
kill -TERM "$VMM_PID"; set +e; wait "$VMM_PID"; echo "exit status $?"; set -e
echo "-- the busiest syscalls (--stats)"; grep -A6 "^syscall " "$ROOT/lighttpd.log" || true
echo

echo "== Debian's redis-server from images/out/redis: checkpoint, change, roll back (guest port 6379 -> 16379)"
target/debug/assure-vmm run --image redis --port 6379=16379 --control "$ROOT/redis.ctl" >"$ROOT/redis.log" 2>&1 &
VMM_PID=$!
for _ in $(seq 200); do redis-cli -p 16379 ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p 16379 set greeting "before the checkpoint" >/dev/null
echo "-- checkpoint"; target/debug/assure-vmm ctl "$ROOT/redis.ctl" checkpoint --digest | grep -E '"(id|dirty_pages|digest|total)"'
echo "-- 1000 SETs, then DBSIZE"; for i in $(seq 1000); do echo "SET key:$i $i"; done | redis-cli -p 16379 >/dev/null
redis-cli -p 16379 dbsize
echo "-- rollback: the same digest, and the keys are gone"
target/debug/assure-vmm ctl "$ROOT/redis.ctl" rollback --digest | grep -E '"(id|restored_pages|digest|total)"'
redis-cli -p 16379 dbsize; redis-cli -p 16379 get greeting
kill -TERM "$VMM_PID"; wait "$VMM_PID" 2>/dev/null || true
echo

BUGSRV=$(cargo run -q -p guest-tools -- path bugsrv)
mkdir -p "$ROOT/www"; cp "$BUGSRV" "$ROOT/bugsrv"; echo "served from the guest" > "$ROOT/www/page.txt"
LOG="$ROOT/vmm.out"
target/debug/assure-vmm --log-level info run --root "$ROOT" --events "$ROOT/events.jsonl" -- /bugsrv -p 0 -d /www >"$LOG" 2>&1 &
VMM_PID=$!
for _ in $(seq 200); do grep -q "listening on" "$LOG" && break; sleep 0.05; done
PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
[ -n "$PORT" ] || { cat "$LOG"; exit 1; }
echo "== bugsrv is running under assure-vmm on 127.0.0.1:$PORT"
echo "-- GET /";               curl -s "http://127.0.0.1:$PORT/"
echo "-- GET /file/page.txt";  curl -s "http://127.0.0.1:$PORT/file/page.txt"
echo "-- GET /echo?msg=hi";    curl -s "http://127.0.0.1:$PORT/echo?msg=hi"; echo
echo "-- malformed request";   printf 'NOT HTTP\r\n\r\n' | timeout 5 python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$PORT)); s.sendall(sys.stdin.buffer.read()); print(s.recv(200).decode().splitlines()[0])"
echo "-- GET /bug/null (a NULL dereference in the request handler)"
curl -s --max-time 10 "http://127.0.0.1:$PORT/bug/null" || true
set +e; wait "$VMM_PID"; STATUS=$?; set -e
echo "== assure-vmm exited with $STATUS (128 + SIGSEGV); its report:"
grep -E "guest crashed|  #" "$LOG" | sed 's/\x1b\[[0-9;]*m//g'
echo "== the same event as JSON:"; cat "$ROOT/events.jsonl"
