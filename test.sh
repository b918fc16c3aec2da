#!/usr/bin/env bash
# Set up (first time) and run the whole test suite; arguments go to pytest.
#   sudo ./test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/scripts/setup.sh" --test
cd "$here"
exec "${TCPSTATES_VENV:-$here/.venv}/bin/python" -m pytest "$@"
