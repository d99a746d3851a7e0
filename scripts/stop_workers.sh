#!/usr/bin/env bash
# Stop the workers started by scripts/start_workers.sh: SIGTERM (each finishes its batch in flight
# and writes its final status), SIGKILL after the timeout, then the PID file is removed.
#
#   scripts/stop_workers.sh [--run-dir DIR] [--timeout 120]
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,5s/^# \{0,1\}//p' "$0" >&2
    exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${ESRFARM_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m coordinator.launcher stop "$@"
