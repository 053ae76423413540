#!/usr/bin/env bash
# Why a held snapshot slows delivery (issue 13): the worker's claim and next-due statements,
# EXPLAIN (ANALYZE, BUFFERS)'d with the worker's own SQL (webhook._worker_statements()) and
# arguments, on an idle queue (a) before any traffic, (b) after N single-row inserts were
# delivered while another session held a REPEATABLE READ snapshot, (c) after that session ended
# and VACUUM ran; (b') as (b) with the endpoint's floor (floors::Floors) at the last delivery
# claimed, as the worker reads after its claims. At (a) it also times 2,000 calls of
# webhook._route() on the idle queue (pgbench: what one routing pass costs the worker when there
# is nothing to route). Run as root on a machine with PostgreSQL 15 and the extension installed
# (cargo pgrx install --release). Prints the buffers and times; writes nothing in the repo.
#   tests/bench/snapshot_profile.sh [N]        (default 30000)
#
# The worker's own profile under a held snapshot (ARCHITECTURE.md, "Stage 4, measured") is taken
# during the snapshot benchmark instead: start `cargo bench --bench webhook -- --only snapshot
# --out /tmp/s.md`, and 100 s later `perf record -F 999 -g -p <pid of "webhook_ext worker for
# app"> -o /tmp/perf.snap -- sleep 8`, then `perf report -i /tmp/perf.snap --no-children --sort
# symbol --stdio`.
set -euo pipefail
N=${1:-30000}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
B=$(pg_config --bindir)
D=$(mktemp -d /tmp/webhook_snapshot_profile.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
RPORT=$((40000 + RANDOM % 20000))
chown postgres "$D"
pg() { runuser -u postgres -- "$@"; }
sql() { pg "$B/psql" -X -q -h "$D" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
    kill "${holder:-0}" "${rx:-0}" 2>/dev/null || true
    pg "$B/pg_ctl" -D "$D/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$D"
}
trap cleanup EXIT
pg "$B/initdb" -D "$D/data" -A trust -U postgres >/dev/null
cat >>"$D/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$D'
port = $PORT
shared_preload_libraries = 'webhook_ext'
webhook.database = 'postgres'
webhook.allowed_networks = '127.0.0.0/8'
autovacuum = off
CONF
pg "$B/pg_ctl" -D "$D/data" -l "$D/log" -w start >/dev/null
SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
python3 "$REPO/scripts/receiver.py" --port "$RPORT" --secret "$SECRET" >/dev/null 2>&1 &
rx=$!
sleep 0.5
sql <<SQL
CREATE EXTENSION webhook_ext;
CREATE TABLE t (id bigserial PRIMARY KEY, v int);
SELECT webhook.create_endpoint('e', 'http://127.0.0.1:$RPORT/', '$SECRET', max_in_flight => 100);
SELECT webhook.subscribe('t', 'e', '{INSERT}');
INSERT INTO t (v) VALUES (0);
SQL
# Each statement's execution time, and every index scan that ran with the pages it touched.
summarise() {
    python3 -c '
import re, sys
lines = sys.stdin.read().splitlines()
for i, l in enumerate(lines):
    t = l.strip()
    if t.startswith("-- "):
        print(t)
    if t.startswith("Execution Time"):
        print("   ", t)
    if t.startswith("->  Seq Scan") or t.startswith("Seq Scan"):
        buf = next((x.strip() for x in lines[i + 1:i + 3] if "Buffers" in x), "")
        print("      %s, %s" % (t.lstrip("-> "), buf))
    m = re.search(r"(Index (Only )?Scan using \S+ on \S+).*actual time=[0-9.]+\.\.([0-9.]+) rows=(\d+) loops=(\d+)", t)
    if m:
        buf = next((x.strip() for x in lines[i + 1:i + 3] if "Buffers" in x), "")
        print("      %s: %s ms, %s rows x %s loops, %s" % (m.group(1), m.group(3), m.group(4), m.group(5), buf))
'
}
explain() {
    echo "-- $1 (claim, next_due, _route, the watermark, the endpoint's health row)"
    local ids='{}' floors='{}'
    if [ $# -ge 3 ]; then ids=$2; floors=$3; fi
    sql -v floor_ids="$ids" -v floors="$floors" <<'SQL'
SELECT format('PREPARE claim(%s) AS %s', array_to_string(params, ', '), sql) FROM webhook._worker_statements() WHERE name = 'claim' \gexec
SELECT format('PREPARE next_due(%s) AS %s', array_to_string(params, ', '), sql) FROM webhook._worker_statements() WHERE name = 'next_due' \gexec
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON)
EXECUTE claim('{}', '{}', 100, 100, 15000, 60000, '{}', '{}', '{1}', 100, 67108864, true, 1, 0, :'floor_ids', :'floors');
ROLLBACK;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON)
EXECUTE next_due('{}', '{}', 100, '{}', '{}', '{1}', true, 1, 0, :'floor_ids', :'floors');
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) SELECT webhook._route();
ROLLBACK;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) SELECT max(routed_below) FROM webhook._router;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) SELECT * FROM webhook._endpoint_state WHERE endpoint_id = 1;
SQL
}
wait_delivered() {
    for _ in $(seq 1 600); do
        left=$(sql -Atc "SELECT count(*) FROM webhook.deliveries WHERE status <> 'delivered'")
        [ "$left" = 0 ] && return
        sleep 0.5
    done
    echo "deliveries did not finish:" >&2
    sql -c "SELECT status, attempts, count(*), min(id), max(id) FROM webhook.deliveries GROUP BY 1, 2" -c "SELECT * FROM webhook._router" >&2
    tail -5 "$D/log" >&2
    exit 1
}
wait_delivered
explain "(a) idle queue, before the traffic" | summarise
echo "SELECT webhook._route();" >"$D/route.sql"
# As the worker calls it: from the watermark it holds in memory (here the table's).
echo "SELECT webhook._route($(sql -Atc "SELECT max(routed_below) FROM webhook._router"));" >"$D/route_from.sql"
chmod a+r "$D/route.sql" "$D/route_from.sql"
echo "    routing pass on the idle queue, 2,000 calls: $(pg "$B/pgbench" -n -h "$D" -p "$PORT" -c 1 -t 2000 -f "$D/route.sql" postgres 2>&1 | grep -E "^latency average")"
echo "    the same from a given watermark, as the worker calls it: $(pg "$B/pgbench" -n -h "$D" -p "$PORT" -c 1 -t 2000 -f "$D/route_from.sql" postgres 2>&1 | grep -E "^latency average")"
pg "$B/psql" -X -q -h "$D" -p "$PORT" -d postgres \
    -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT 1 FROM t LIMIT 1" -c "SELECT pg_sleep(3600)" >/dev/null 2>&1 &
holder=$!
sleep 1
echo "INSERT INTO t (v) VALUES (1);" >"$D/insert.sql"
chmod a+r "$D/insert.sql"
pg "$B/pgbench" -n -h "$D" -p "$PORT" -c 1 -t "$N" -f "$D/insert.sql" postgres 2>&1 | grep -E "^tps|transactions actually"
wait_delivered
explain "(b) idle queue, $N deliveries made while a snapshot is held, claim reading from the start" | summarise
top=$(sql -Atc "SELECT max(id) FROM webhook._deliveries")
explain "(b') the same, claim reading above the endpoint's floor ($top, the last delivery it took)" "{1}" "{$top}" | summarise
# (pg_sleep does not notice its client leaving: end the backend itself)
sql -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3600)%' AND pid <> pg_backend_pid()" >/dev/null
wait "$holder" 2>/dev/null || true
sql -c "VACUUM webhook._deliveries, webhook._events"
explain "(c) after the snapshot ended and VACUUM" | summarise
