#!/usr/bin/env bash
# The one test command (README, .ci/run): set-up as needed, then every test, ending with the line
# "N passed, N failed". Extra arguments select test files (default: all of test/).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh || { echo "set-up failed"; echo "0 passed, 1 failed"; exit 1; }
. scripts/env.sh
mkdir -p .tap
files=("$@")
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(find test -name '*.test.ts' | sort)
tap --reporter=tap --no-color --disable-coverage "${files[@]}" 2>&1 | node scripts/tap-summary.ts
status=("${PIPESTATUS[@]}")
# tap's own status also covers a test file that crashed before printing any TAP.
if [ "${status[0]}" -ne 0 ] || [ "${status[1]}" -ne 0 ]; then exit 1; fi
