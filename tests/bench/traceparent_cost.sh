#!/usr/bin/env bash
# The write path's cost of webhook.traceparent, and the one-row INSERT without a trigger as the
# machine's baseline (tests/bench/2026-12-07-traceparent-cost.md). Runs as the postgres user
# against the installed build (scripts/package, then tar -xzf … -C /): a throwaway cluster in
# /tmp/tpcost (port 5491, no worker: webhook.database names another database), synchronous_commit
# off so that the figures are CPU, one-row INSERTs by pgbench, 10 s a run, runs interleaved.
#   su postgres -c 'bash tests/bench/traceparent_cost.sh'
set -euo pipefail
B=${PG_BIN:-/usr/lib/postgresql/15/bin}
D=/tmp/tpcost
rm -rf "$D" && mkdir -p "$D"
"$B/initdb" -D "$D/data" -A trust >/dev/null
cat >> "$D/data/postgresql.conf" <<CONF
port = 5491
unix_socket_directories = '$D'
shared_preload_libraries = 'webhook_ext'
webhook.database = 'nothere'
synchronous_commit = off
CONF
"$B/pg_ctl" -D "$D/data" -l "$D/log" -w start >/dev/null
trap '"$B/pg_ctl" -D "$D/data" -m fast stop >/dev/null' EXIT
P=("$B/psql" -h "$D" -p 5491 -q -v ON_ERROR_STOP=1)
"${P[@]}" -d postgres -c "CREATE DATABASE tp"
"${P[@]}" -d tp -c "CREATE EXTENSION webhook_ext" 2>/dev/null
"${P[@]}" -d tp -c "SELECT webhook.create_endpoint('e1', 'https://e1.example.com/h');
  CREATE TABLE t (id bigserial PRIMARY KEY, email text, n int);
  CREATE TABLE t0 (id bigserial PRIMARY KEY, email text, n int);
  SELECT webhook.subscribe('t', 'e1', events => '{INSERT}')" >/dev/null
echo "INSERT INTO t (email, n) VALUES ('a@example.com', 1);" > "$D/one.sql"
echo "INSERT INTO t0 (email, n) VALUES ('a@example.com', 1);" > "$D/zero.sql"
tps() { PGOPTIONS="${2:-}" "$B/pgbench" -h "$D" -p 5491 -n -c1 -T10 -f "$D/$1.sql" tp 2>/dev/null | awk '/^tps/ {print $3}'; }
TP="-c webhook.traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
for i in 1 2 3; do
    echo "run $i: no trigger $(tps zero) TPS; subscribed, traceparent unset $(tps one) TPS; set $(tps one "$TP") TPS"
done
