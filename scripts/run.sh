#!/usr/bin/env bash
# README's main command: set-up as needed, then the main job — start a real node (HTTPS gateway with a
# warm pool of isolated one-shot workers on the built-in tiny model, keyd holding the vault's keys) on
# loopback, and stream a SEALED chat through it: encrypted on this side to the node's request keys, pinned
# by the node's identity fingerprint only, answered with a receipt signed by that identity. The node is
# stopped (SIGTERM, drained) at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
port=${PHANTOMA_DEMO_PORT:-8443}
state=.state/demo
mkdir -p "$state"
chmod 700 "$state"
settings=(--stateDir="$state" --warden.start=true --warden.socket=/run/phantoma/warden.sock --vault.keydSocket=/run/phantoma/keyd/keyd.sock
  --gateway.host=127.0.0.1 --gateway.port="$port" --gateway.metricsPort=0 --inference.threads=2)

# The demo's vault passphrase lives in the demo's state dir; a real node takes it from a systemd credential.
if [ ! -s "$state/vault-passphrase" ]; then
  (umask 077 && head -c 24 /dev/urandom | base64 > "$state/vault-passphrase")
fi
PHANTOMA_VAULT_PASSPHRASE=$(cat "$state/vault-passphrase")
export PHANTOMA_VAULT_PASSPHRASE
[ -f "$state/vault.phv" ] || bin/phantoma vault init "${settings[@]}"
# The client's own key, made "on the client" (here, the same machine) and registered with the node.
if [ ! -f "$state/demo-client.key" ]; then
  public=$(bin/phantoma client-key new "$state/demo-client.key" --json | sed -E 's/.*"publicKey":"([^"]+)".*/\1/')
  bin/phantoma clients add demo "$public" "${settings[@]}"
fi

log=$(mktemp)
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
identity=$(bin/phantoma keys show --json "${settings[@]}" | sed -E 's/.*"identityFingerprint":"([^"]+)".*/\1/')
echo "pinned identity $identity; streaming a sealed chat (the receipt follows on stderr):"
bin/phantoma chat --node "https://127.0.0.1:$port" --pin "$identity" --client-name demo --client-key "$state/demo-client.key" --receipt \
  --max-tokens 48 "${@:-Hello! What can a private inference node do?}"
