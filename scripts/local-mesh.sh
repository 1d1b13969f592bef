#!/usr/bin/env bash
# Starts a three-region mesh on this machine: us-east-1 on :8081, eu-central-1 on :8082 and
# ap-southeast-1 on :8083, each with its own SQLite database under data/local-mesh/ (or, with
# LOCAL_MESH_PG=postgres://user@host, its own PostgreSQL database). Every node dials the other
# two. Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
dir=data/local-mesh
mkdir -p "$dir"
secret=${CRDT_MESH_SECRET:-local-mesh-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
regions=(us-east-1 eu-central-1 ap-southeast-1)
ports=(8081 8082 8083)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; echo; echo "mesh stopped"' EXIT INT TERM

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
  REGION=$region NODE_ID="local-$region" PORT=${ports[$i]} DATABASE_URL=$url \
    CRDT_MESH_SECRET=$secret CRDT_MESH_PEERS=$(IFS=,; echo "${peers[*]}") \
    RUST_LOG=${RUST_LOG:-info,automerge=warn} \
    target/release/crdt-node >"$dir/$region.log" 2>&1 &
  pids+=($!)
  echo "$region: http://127.0.0.1:${ports[$i]}  (log: $dir/$region.log)"
done
echo "mesh secret: $secret"
echo "status: curl -s http://127.0.0.1:8081/api/crdt/mesh/status"
wait
