#!/usr/bin/env bash
# Starts a 3-node Portrait cluster on loopback (client ports 7701-7703, peer
# ports 8701-8703, data in ./data/cluster/nodeN) and waits. Node 1 bootstraps
# the cluster; nodes 2 and 3 join it by themselves (`portraitd --join` with
# node 1's peer address). A rerun restarts all three from disk (no bootstrap,
# no join). Ctrl-C stops them. Run `make build` first (make cluster does).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=./target/release
BASE=${PORTRAIT_CLUSTER_DIR:-./data/cluster}
mkdir -p "$BASE"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for id in 1 2 3; do
  args=(--node-id "$id" --data-dir "$BASE/node$id" --listen "127.0.0.1:770$id"
        --peer-listen "127.0.0.1:870$id")
  # Node 1 forms the cluster, of ${SHARDS:-4} shards; the others join it and
  # learn the number of shards from it (a restart does neither).
  if [ "$id" = 1 ]; then args+=(--shards "${SHARDS:-4}"); else args+=(--join http://127.0.0.1:8701); fi
  "$BIN/portraitd" "${args[@]}" >"$BASE/node$id.log" 2>&1 &
  pids+=($!)
done

P="$BIN/portrait --endpoint http://127.0.0.1:7701"
# Wait (at most 20 s) until the three nodes are voters: count the member
# rows of `portrait status` ("    2  http://127.0.0.1:7702  voter ..."),
# not its "meta group      leader 1, voters 1, 2, 3" line.
for _ in $(seq 100); do
  [ "$($P status 2>/dev/null | grep -cE '^ +[0-9]+  .+  voter( |$)')" = 3 ] && break
  sleep 0.2
done
$P cluster status
cat <<MSG

Portrait cluster running:
  node 1  http://127.0.0.1:7701   peer port 8701   log $BASE/node1.log
  node 2  http://127.0.0.1:7702   peer port 8702   log $BASE/node2.log
  node 3  http://127.0.0.1:7703   peer port 8703   log $BASE/node3.log
Try:  $BIN/portrait --endpoint http://127.0.0.1:7702 put --json '{"user_id":"u1","family":"browse","type":"view","attrs":{"category":"phone"}}'
      $BIN/portrait --endpoint http://127.0.0.1:7703 get u1
Ctrl-C stops the cluster (data stays in $BASE).
MSG
wait
