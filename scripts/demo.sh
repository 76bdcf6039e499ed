#!/usr/bin/env bash
# Set up, then run real servers under assure-vmm with rescue points:
#  1. Debian's lighttpd (stripped) under wrk load, with a fault injected below its request
#     parser every 10th request: each one is rolled back and answered 400, the rest 200.
#  2. Debian's redis-server fed 1000 SETs, with a fault below its command lookup.
#  3. bugsrv (a C server with real bugs): each bug class rescued, then the same bug without
#     a rescue point, which ends the run with a crash event.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ROOT=$(mktemp -d); trap 'rm -rf "$ROOT"; kill "${VMM_PID:-}" 2>/dev/null || true' EXIT
VMM=target/debug/assure-vmm
strip_colors() { sed 's/\x1b\[[0-9;]*m//g'; }
count_events() { grep -c "\"event\":\"$1\"" "$2" 2>/dev/null || true; }

echo "== Debian's lighttpd with a rescue point on http_request_parse_target (guest port 8080 -> 18080)"
cat > "$ROOT/lighttpd.toml" <<'EOF'
[[rescue]]
name = "parse_target"
function = "http_request_parse_target"   # .dynsym of the stripped Debian binary
return = 400                             # its callers answer 400 Bad Request
hang_timeout_ms = 500
max_recoveries_per_minute = 100000       # the default (600) would quarantine it under wrk
EOF
cat "$ROOT/lighttpd.toml"
$VMM run --image lighttpd --port 8080=18080 --rescue "$ROOT/lighttpd.toml" \
    --inject 'burl_normalize:nth=10:every=10:kind=segv' \
    --events "$ROOT/lighttpd.events" --control "$ROOT/lighttpd.ctl" >"$ROOT/lighttpd.log" 2>&1 &
VMM_PID=$!
for _ in $(seq 200); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.05; done
echo "-- wrk for 5 s (every 10th request faults with SIGSEGV inside the parser)"
wrk -t2 -c8 -d5s http://127.0.0.1:18080/ | grep -E "requests in|Non-2xx|Socket errors|Requests/sec"
echo "-- recoveries: $(count_events recovery "$ROOT/lighttpd.events"); the server still answers:"
curl -s -o /dev/null -w "GET / -> %{http_code}\n" http://127.0.0.1:18080/
echo "-- one recovery as the log shows it:"
grep -m1 -A4 "rescued:" "$ROOT/lighttpd.log" | strip_colors | cut -c 28-
echo "-- assure-vmm ctl rescue (the point's counters)"
$VMM ctl "$ROOT/lighttpd.ctl" rescue | grep -E '"(name|resolved|entries|windows|commits|recoveries|mean_window_us)"'
kill -TERM "$VMM_PID"; wait "$VMM_PID" 2>/dev/null || true
echo

echo "== Debian's redis-server with a rescue point on lookupCommandLogic (guest port 6379 -> 16379)"
cat > "$ROOT/redis.toml" <<'EOF'
[[rescue]]
name = "lookup_command"
function = "lookupCommandLogic"
return = "null"                          # the client gets -ERR unknown command
EOF
$VMM run --image redis --port 6379=16379 --rescue "$ROOT/redis.toml" \
    --inject 'dictFetchValue:nth=50:every=50:kind=abort' \
    --events "$ROOT/redis.events" >"$ROOT/redis.log" 2>&1 &
VMM_PID=$!
for _ in $(seq 200); do redis-cli -p 16379 ping >/dev/null 2>&1 && break; sleep 0.05; done
echo "-- 1000 SETs through redis-cli (every 50th command lookup aborts): the replies, counted"
for i in $(seq 1000); do echo "SET key:$i $i"; done | redis-cli -p 16379 2>&1 | sed 's/, with args.*//' | grep -v '^$' | sort | uniq -c
echo "-- recoveries: $(count_events recovery "$ROOT/redis.events"); the server still answers:"
redis-cli -p 16379 set greeting "still here" >/dev/null; redis-cli -p 16379 get greeting
kill -TERM "$VMM_PID"; wait "$VMM_PID" 2>/dev/null || true
echo

BUGSRV=$(cargo run -q -p guest-tools -- path bugsrv.stripped)
mkdir -p "$ROOT/www"; cp "$BUGSRV" "$ROOT/bugsrv"; echo "served from the guest" > "$ROOT/www/page.txt"
OFFSET=$($VMM functions "$(cargo run -q -p guest-tools -- path bugsrv)" --match process_request 2>/dev/null | awk '$3 == "process_request" {print $1}')
cat > "$ROOT/bugsrv.toml" <<EOF
[[rescue]]
name = "request"
offset = $OFFSET          # process_request: the stripped binary has no name for it
return = -1               # bugsrv answers 500 when it returns -1
hang_timeout_ms = 300
EOF
start_bugsrv() {
    LOG="$ROOT/bugsrv.out"
    $VMM run --root "$ROOT" --events "$ROOT/bugsrv.events" "$@" -- /bugsrv -p 0 -d /www >"$LOG" 2>&1 &
    VMM_PID=$!
    for _ in $(seq 200); do grep -q "listening on" "$LOG" && break; sleep 0.05; done
    PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
    [ -n "$PORT" ] || { cat "$LOG"; exit 1; }
}
echo "== bugsrv (stripped) with a rescue point at process_request ($OFFSET)"
start_bugsrv --rescue "$ROOT/bugsrv.toml"
for route in /bug/null "/bug/div?d=0" /bug/heap "/bug/stack?n=200" /bug/abort /bug/loop /file/page.txt; do
    curl -s --max-time 10 -o /dev/null -w "GET $route -> %{http_code}\n" "http://127.0.0.1:$PORT$route"
done
grep -E "rescued:" "$LOG" | strip_colors | sed 's/.*rescued:/rescued:/'
kill -TERM "$VMM_PID"; wait "$VMM_PID" 2>/dev/null || true
echo
echo "== the same server without the rescue point: GET /bug/null"
rm -f "$ROOT/bugsrv.events"
start_bugsrv
curl -s --max-time 10 "http://127.0.0.1:$PORT/bug/null" || true
set +e; wait "$VMM_PID"; STATUS=$?; set -e
echo "== assure-vmm exited with $STATUS (128 + SIGSEGV); its report:"
grep -E "guest crashed|  #" "$LOG" | strip_colors | sed 's/.*\(guest crashed\)/\1/; s/.*\(  #\)/\1/'
