#!/usr/bin/env bash
# Durable graft throughput of two builds, alternating:
#   scripts/throughput-ab.sh BEFORE_BIN BEFORE_CONFIG AFTER_BIN AFTER_CONFIG [rounds] [seconds]
# runs each node binary with its configuration file on a fresh SQLite database and drives it
# with wrk (64 connections, a graft to one of 1,000 runs per request; `apt-get install wrk`),
# printing requests/s and p99 per round. AB_BACKEND=postgres runs each on a fresh database of
# the local PostgreSQL server (postgres://postgres@127.0.0.1:5432) instead.
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
  local out
  out=$(wrk -t2 -c64 -d"${secs}s" --latency -s "$here/wrk-graft.lua" "http://127.0.0.1:$port")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  if [ -n "$pg_name" ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $pg_name WITH (FORCE)" >/dev/null
  fi
  printf '%s\t%s\t%s\n' "$name" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")"
}
printf 'build\trequests/s\tp99\n'
for _ in $(seq 1 "$rounds"); do
  run_one before "$before" "$before_config"
  run_one after "$after" "$after_config"
done
