#!/usr/bin/env bash
# README's main command: set-up as needed, then the main job — for now, the built-in tiny model answers
# one chat prompt in-process through node-llama-cpp, streaming its tokens.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
exec bin/phantoma local-chat --max-tokens 64 "${@:-Hello! What can a private inference node do?}"
