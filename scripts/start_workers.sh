#!/usr/bin/env bash
# Start N esrfarm workers on this host (for hosts without systemd) and wait until each answers /health.
#
#   scripts/start_workers.sh N [--base-port 8090] [--cpu] [--run-dir DIR] [--health-timeout S] [WORKER FLAGS...]
#   scripts/start_workers.sh 2 --shared-root /srv/esrfarm --model realesr-animevideov3
#
# Worker i runs on GPU i (CUDA_VISIBLE_DEVICES=i) and port base+i; --base-port 0 picks free ports.
# PIDs and URLs are recorded in DIR/workers.json (default $XDG_RUNTIME_DIR/esrfarm or
# /tmp/esrfarm-$UID), logs in DIR/worker-i.log. Stop them with scripts/stop_workers.sh.
# Python: $ESRFARM_PYTHON, else the repository's .venv, else python3.
set -euo pipefail

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0" >&2
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 2
fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "start_workers.sh: the first argument must be the number of workers (1 or more), not '$1'" >&2
    usage
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${ESRFARM_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m coordinator.launcher start "$@"
