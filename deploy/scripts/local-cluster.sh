#!/usr/bin/env bash
# Starts a 3-node Portrait cluster on loopback (ports 7701-7703, data in
# ./data/cluster/nodeN), forms it with `portrait cluster add-node`, and waits.
# Ctrl-C stops all three nodes. Run `make build` first (make cluster does).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=./target/release
BASE=${PORTRAIT_CLUSTER_DIR:-./data/cluster}
mkdir -p "$BASE"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for id in 1 2 3; do
  args=(--node-id "$id" --data-dir "$BASE/node$id" --listen "127.0.0.1:770$id")
  # Node 1 forms the cluster; the others join it (a restart skips bootstrap anyway).
  [ "$id" = 1 ] || args+=(--no-bootstrap)
  "$BIN/portraitd" "${args[@]}" >"$BASE/node$id.log" 2>&1 &
  pids+=($!)
done

P="$BIN/portrait --endpoint http://127.0.0.1:7701"
for _ in $(seq 50); do $P status >/dev/null 2>&1 && break; sleep 0.2; done
for id in 2 3; do
  if ! $P status | grep -q "http://127.0.0.1:770$id"; then
    $P cluster add-node "$id" "http://127.0.0.1:770$id" >/dev/null
  fi
done
$P cluster status
cat <<MSG

Portrait cluster running:
  node 1  http://127.0.0.1:7701   log $BASE/node1.log
  node 2  http://127.0.0.1:7702   log $BASE/node2.log
  node 3  http://127.0.0.1:7703   log $BASE/node3.log
Try:  $BIN/portrait --endpoint http://127.0.0.1:7702 put --json '{"user_id":"u1","family":"browse","type":"view","attrs":{"category":"phone"}}'
      $BIN/portrait --endpoint http://127.0.0.1:7703 get u1
Ctrl-C stops the cluster (data stays in $BASE).
MSG
wait
