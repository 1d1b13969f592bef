#!/usr/bin/env bash
# Durable graft throughput of two builds, alternating:
#   scripts/throughput-ab.sh BEFORE_BIN BEFORE_CONFIG AFTER_BIN AFTER_CONFIG [rounds] [seconds]
# runs each node binary with its configuration file on a fresh SQLite database and drives it
# with wrk (64 connections, a graft to one of 1,000 runs per request; `apt-get install wrk`),
# printing per round, after a 3 s warm-up: requests/s, p90 and p99 (wrk's), the commits of the
# event log that took over 25 ms and the bytes the node wrote to disk per request (both over the
# measured window, from /actuator/prometheus and /proc/PID/io). AB_BACKEND=postgres runs each on
# a fresh database of the local PostgreSQL server (postgres://postgres@127.0.0.1:5432) instead.
set -euo pipefail
before=$1 before_config=$2 after=$3 after_config=$4 rounds=${5:-2} secs=${6:-10}
here="$(cd "$(dirname "$0")" && pwd)"
run_one() {
  local name=$1 bin=$2 config=$3 dir port pid
  dir=$(mktemp -d)
  port=$((20000 + RANDOM % 10000))
  local db="sqlite://$dir/db" pg_name=""
  if [ "${AB_BACKEND:-sqlite}" = postgres ]; then
    pg_name="crdt_ab_${name}_$RANDOM"
    db="postgres://postgres@127.0.0.1:5432/$pg_name"
  fi
  CRDT_CONFIG="$config" DATABASE_URL="$db" DATABASE_CREATE_IF_MISSING=true PORT=$port \
    RUST_LOG=warn "$bin" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/actuator/health" >/dev/null && break; sleep 0.1; done
  local url="http://127.0.0.1:$port" out slow0 slow1 bytes0 bytes1
  wrk -t2 -c64 -d3s -s "$here/wrk-graft.lua" "$url" >/dev/null
  slow0=$(slow_commits "$url"); bytes0=$(written "$pid")
  out=$(wrk -t2 -c64 -d"${secs}s" --latency -s "$here/wrk-graft.lua" "$url")
  slow1=$(slow_commits "$url"); bytes1=$(written "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  if [ -n "$pg_name" ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $pg_name WITH (FORCE)" >/dev/null
  fi
  local rate
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rate" "$(awk '$1 == "90%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")" "$((slow1 - slow0))" \
    "$(awk -v b="$((bytes1 - bytes0))" -v r="$rate" -v s="$secs" 'BEGIN {printf "%.1f", b / (r * s) / 1024}')"
}
# Commits of the event log so far that took over 25 ms.
slow_commits() {
  curl -s "$1/actuator/prometheus" | awk '
    /^crdt_commit_duration_seconds_count/ {all = $2}
    /^crdt_commit_duration_seconds_bucket\{le="0.025"\}/ {fast = $2}
    END {printf "%d", all - fast}'
}
# Bytes the process has written to disk so far.
written() { awk '$1 == "write_bytes:" {print $2}' "/proc/$1/io"; }
printf 'build\trequests/s\tp90\tp99\tcommits>25ms\tKiB written/request\n'
for _ in $(seq 1 "$rounds"); do
  run_one before "$before" "$before_config"
  run_one after "$after" "$after_config"
done
