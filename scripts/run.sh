#!/usr/bin/env bash
# README's main command: set-up as needed, then the main job — start a real node (HTTPS gateway with a
# warm pool of one-shot workers on the built-in tiny model) on loopback, make an API key, and stream a
# chat through it with the certificate pinned. The node is stopped (SIGTERM, drained) at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
port=${PHANTOMA_DEMO_PORT:-8443}
state=.state/demo
log=$(mktemp)
settings=(--stateDir="$state" --warden.start=true --warden.socket=/run/phantoma/warden.sock --gateway.host=127.0.0.1 --gateway.port="$port" --gateway.metricsPort=0 --inference.threads=2)
bin/phantoma serve "${settings[@]}" >"$log" 2>"$log.err" &
node_pid=$!
cleanup() { kill -TERM "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null; rm -f "$log" "$log.err"; }
trap cleanup EXIT
for _ in $(seq 1 300); do
  grep -q 'serving' "$log" && curl -skf "https://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$node_pid" 2>/dev/null || { cat "$log.err" >&2; echo "the node did not start" >&2; exit 1; }
  sleep 0.2
done
cat "$log"
fingerprint=$(bin/phantoma keys show --json "${settings[@]}" | sed -E 's/.*"tlsFingerprint":"([^"]+)".*/\1/')
PHANTOMA_API_KEY=$(bin/phantoma apikeys create "demo-$(date +%s)" --json "${settings[@]}" | sed -E 's/.*"key":"([^"]+)".*/\1/')
export PHANTOMA_API_KEY
echo "pinned TLS SHA-256 $fingerprint; streaming a chat:"
bin/phantoma chat --url "https://127.0.0.1:$port" --pin "$fingerprint" --max-tokens 48 "${@:-Hello! What can a private inference node do?}"
