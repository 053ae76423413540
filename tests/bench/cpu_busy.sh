#!/usr/bin/env bash
# Prints how busy the machine's CPUs are, each second, while a command runs (from /proc/stat:
# the share of time neither idle nor waiting for I/O), then the command's own output.
# Used for tests/bench/2026-12-06-where-the-time-goes.md:
#   tests/bench/cpu_busy.sh cargo bench --bench webhook -- --only ceiling --out /tmp/ceiling.md
set -euo pipefail
out=$(mktemp)
"$@" >"$out" 2>&1 &
pid=$!
read -r _ a1 a2 a3 a4 a5 a6 a7 a8 _ </proc/stat
while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    read -r _ b1 b2 b3 b4 b5 b6 b7 b8 _ </proc/stat
    total=$(( (b1+b2+b3+b4+b5+b6+b7+b8) - (a1+a2+a3+a4+a5+a6+a7+a8) ))
    idle=$(( (b4+b5) - (a4+a5) ))
    [ "$total" -gt 0 ] && echo "busy $(( 100 * (total - idle) / total )) %"
    a1=$b1 a2=$b2 a3=$b3 a4=$b4 a5=$b5 a6=$b6 a7=$b7 a8=$b8
done
wait "$pid"
cat "$out"
rm -f "$out"
