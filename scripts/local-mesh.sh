#!/usr/bin/env bash
# Starts a three-region mesh on this machine: us-east-1 on :8081, eu-central-1 on :8082 and
# ap-southeast-1 on :8083, each with its own SQLite database under data/local-mesh/ (or, with
# LOCAL_MESH_PG=postgres://user@host, its own PostgreSQL database). Every node dials the other
# two. Ctrl-C stops all three (and the script exits 0). The binary is built into
# $CARGO_TARGET_DIR when it is set, else target/.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "building the release binary (about 10 minutes the first time, seconds after)…"
cargo build --release --quiet --bin crdt-node
bin="${CARGO_TARGET_DIR:-target}/release/crdt-node"
dir=data/local-mesh
mkdir -p "$dir"
secret=${CRDT_MESH_SECRET:-local-mesh-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
regions=(us-east-1 eu-central-1 ap-southeast-1)
ports=(8081 8082 8083)
pids=()
stop() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo
  echo "mesh stopped"
  exit 0
}
# Ctrl-C (or a kill) is how this script is meant to end: stop the nodes and exit 0.
trap stop INT TERM
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

for i in 0 1 2; do
  region=${regions[$i]}
  peers=()
  for j in 0 1 2; do
    [[ $j == "$i" ]] || peers+=("ws://127.0.0.1:${ports[$j]}/ws")
  done
  if [[ -n ${LOCAL_MESH_PG:-} ]]; then
    db_name="crdt_${region//-/_}"
    psql "${LOCAL_MESH_PG}/postgres" -qc "CREATE DATABASE $db_name" 2>/dev/null || true
    url="${LOCAL_MESH_PG}/$db_name"
  else
    url="sqlite://$dir/$region.db"
  fi
  # Each start appends to the region's log, after a line that marks it.
  echo "=== $(date -u +%FT%TZ) local-mesh start" >>"$dir/$region.log"
  REGION=$region NODE_ID="local-$region" PORT=${ports[$i]} DATABASE_URL=$url \
    CRDT_MESH_SECRET=$secret CRDT_MESH_PEERS=$(IFS=,; echo "${peers[*]}") \
    RUST_LOG=${RUST_LOG:-info,automerge=warn,actix_web_prom=error} \
    "$bin" >>"$dir/$region.log" 2>&1 &
  pids+=($!)
  echo "$region: http://127.0.0.1:${ports[$i]}  (log: $dir/$region.log)"
done
echo "mesh secret: $secret"
echo "status: curl -s http://127.0.0.1:8081/api/crdt/mesh/status"
wait
