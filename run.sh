#!/usr/bin/env bash
# Set up (first time) and run tcpstates; arguments go to tcpstates.
#   sudo ./run.sh -tw
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/scripts/setup.sh"
exec "${TCPSTATES_VENV:-$here/.venv}/bin/tcpstates" "$@"
