#!/usr/bin/env bash
# crdt-node, automerge-repo-sync-server 0.2.8 and a samod server side by side, driven by the
# Rust automerge-repo load client (benches/repo_load.rs), issue 23's cells:
#   scripts/side-by-side.sh [secs per trial]
# For each cell (writers × documents), the highest rate each server sustains — every change
# delivered, p99 ≤ 250 ms, ≥ 95% of the offered rate sent — with the servers taking turns at
# each rate. Builds the samod server (benches/samod-server, outside the workspace) and installs
# the reference server (e2e/, npm ci) first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
[[ -x benches/samod-server/target/release/samod-server ]] \
  || cargo build --release --manifest-path benches/samod-server/Cargo.toml
[[ -d e2e/node_modules/@automerge/automerge-repo-sync-server ]] \
  || (cd e2e && npm ci --no-audit --no-fund --loglevel=error)
cargo bench --bench repo_load --no-run
# writers, documents, first rate tried
for cell in "10 1 100" "10 100 200" "100 100 400" "1000 100 250"; do
  read -r clients docs rate <<<"$cell"
  echo "== $clients writers × $docs documents"
  cargo bench --bench repo_load -- --clients "$clients" --docs "$docs" --rate "$rate" \
    --secs "$secs" --servers crdt-node,reference,samod --find-max
done
