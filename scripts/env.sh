# Puts the project's pinned Node runtime first on PATH and points native builds at its headers.
# Sourced by the other scripts, not executed.
_phantoma_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$_phantoma_root/.runtime/bin:$_phantoma_root/node_modules/.bin:$PATH"
export npm_config_nodedir="$_phantoma_root/.runtime"
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true
unset _phantoma_root
