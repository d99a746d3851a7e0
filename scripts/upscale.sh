#!/usr/bin/env bash
# Upscale one video: the original wrapper's interface over `esrfarm upscale`.
#
#   scripts/upscale.sh INPUT OUTPUT SCALE [esrfarm upscale options...]
#   scripts/upscale.sh in.mp4 out.mp4 2
#   scripts/upscale.sh in.mp4 out.mp4 4 --model realesrgan-x4plus --codec libx265
#
# SCALE is what `esrfarm upscale --scale` takes: 1/16 to 16, usually 2, 3 or 4; above the model's
# own (x4, x2 for realesrgan-x2plus) its output is resized, with a warning. Local workers are
# started (one per GPU, or one on the CPU) unless --workers URL,... is given.
# Python: $ESRFARM_PYTHON, else the repository's .venv, else python3.
set -euo pipefail

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "$0" >&2
}

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -lt 3 ]]; then
    echo "upscale.sh: expected INPUT OUTPUT SCALE, got $# argument(s)" >&2
    usage
    exit 2
fi
input=$1 output=$2 scale=$3
shift 3
if [[ ! -f "$input" ]]; then
    echo "upscale.sh: input '$input' is not a file" >&2
    exit 2
fi
if ! [[ "$scale" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "upscale.sh: SCALE must be a number (e.g. 2, 3 or 4), not '$scale'" >&2
    exit 2
fi  # its range is the CLI's to check: one rule, one place

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${ESRFARM_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m coordinator.cli upscale "$input" "$output" --scale "$scale" "$@"
