#!/usr/bin/env bash
# Compiles src/ to dist/ (plain JavaScript) when any source is newer than the last build. Workers run the
# compiled code: Node's TypeScript stripping loads a WebAssembly compiler into every process (≈13 MB
# per worker measured here), and a node has one worker per warm slot.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=dist/.build-stamp
if [ -f "$stamp" ] && [ -z "$(find src tsconfig.json tsconfig.build.json -newer "$stamp" -print -quit)" ]; then exit 0; fi
rm -rf dist.new
# --noCheck: emit only (type stripping needs no types); test/typecheck.test.ts type-checks everything.
node_modules/.bin/tsc -p tsconfig.build.json --outDir dist.new --noCheck
rm -rf dist
mv dist.new dist
touch "$stamp"
