#!/usr/bin/env bash
# Brume demo on one machine: a private mosquitto (the "cloud" broker), a hub storing into
# SQLite with its web dashboard, and an edge agent with simulated sensors and a WASM
# module (downsample: 10-second windows of every sim/* stream, with lineage). Everything
# lives in ./demo-data and listens on 127.0.0.1. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release --locked -p edge-agent -p cloud-hub
cargo xtask build-modules >/dev/null

DATA="$PWD/demo-data"
mkdir -p "$DATA"
BROKER_PORT=${BROKER_PORT:-18830}
HUB_HTTP=${HUB_HTTP:-127.0.0.1:8080}
AGENT_HTTP=${AGENT_HTTP:-127.0.0.1:8181}
AGENT_MQTT=${AGENT_MQTT:-127.0.0.1:1884}

cat > "$DATA/mosquitto.conf" <<CONF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)

pids=()
cleanup() {
  echo; echo "stopping..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# A publisher key for module rollouts: the hub accepts modules it signed, and the agent
# runs them (README: "Rolling out modules to a fleet").
[ -f "$DATA/publisher.key" ] || ./target/release/cloud-hub module keygen --out "$DATA/publisher.key" >/dev/null 2>&1
PUBKEY=$(./target/release/cloud-hub module pubkey --key "$DATA/publisher.key")
cat > "$DATA/hub.toml" <<CONF
[fleet]
trusted_keys = ["$PUBKEY"]
reconcile_interval = "1s"
CONF
cat > "$DATA/agent.toml" <<CONF
[labels]
site = "demo"
[fleet]
hub_url = "http://$HUB_HTTP"
trusted_keys = ["$PUBKEY"]

# Runs on the device: 10-second min/mean/max windows of every simulated stream, written
# to the stream "downsampled" with the module build recorded as the readings' lineage.
[[modules]]
path = "$PWD/target/modules/downsample.wasm"
config = { window_s = 10, field = "value" }
inputs = ["sim/#"]
CONF

"$MOSQ" -c "$DATA/mosquitto.conf" >"$DATA/mosquitto.log" 2>&1 & pids+=($!)
./target/release/cloud-hub --config "$DATA/hub.toml" --data-dir "$DATA/hub" --mqtt-port "$BROKER_PORT" \
  --http-listen "$HUB_HTTP" >"$DATA/hub.log" 2>&1 & pids+=($!)
./target/release/edge-agent --config "$DATA/agent.toml" --agent-id demo-edge --data-dir "$DATA/agent" \
  --broker "127.0.0.1:$BROKER_PORT" --mqtt-listen "$AGENT_MQTT" --http-listen "$AGENT_HTTP" --simulate 20 \
  >"$DATA/agent.log" 2>&1 & pids+=($!)

sleep 2
cat <<MSG

Brume demo running (logs in $DATA/*.log).

  Dashboard:          http://$HUB_HTTP/

Simulated sensors sim/0..sim/3 publish 20 readings/s; the agent's downsample module
writes 10-second windows to "downsampled" (pick it on the dashboard, field "mean").

  Hub streams:        curl -s http://$HUB_HTTP/api/v1/streams
  Hub readings:       curl -s 'http://$HUB_HTTP/api/v1/readings?stream=sim/0&limit=5'
  Hub agents & gaps:  curl -s http://$HUB_HTTP/api/v1/agents
  Agents online:      curl -s http://$HUB_HTTP/api/v1/presence
  Last hour, 60 pts:  curl -s "http://$HUB_HTTP/api/v1/aggregate?stream=sim/0&from=\$(( (\$(date +%s) - 3600) * 1000000000 ))&to=\$(date +%s)000000000&buckets=60"
  Live (SSE):         curl -sN 'http://$HUB_HTTP/api/v1/tail?stream=sim/0&step=10s'
  Agent status:       curl -s http://$AGENT_HTTP/api/v1/status
  Agent metrics:      curl -s http://$AGENT_HTTP/metrics
  Publish a reading:  mosquitto_pub -h ${AGENT_MQTT%:*} -p ${AGENT_MQTT#*:} -q 1 -t line1/temp -m '{"celsius": 21.5}'
  HTTP ingest:        curl -s -XPOST 'http://$AGENT_HTTP/api/v1/write' --data-binary 'boiler,site=a temp=71.2'
  Roll out a module:  see README "Rolling out modules to a fleet" (key: $DATA/publisher.key)
  Simulate an outage: kill the broker (pid ${pids[0]}) and watch the agent's outbox grow, then
                      restart it: $MOSQ -c $DATA/mosquitto.conf -d

Ctrl-C to stop.
MSG
wait
