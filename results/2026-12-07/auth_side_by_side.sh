#!/usr/bin/env bash
# Issue 15: what authentication costs, side by side in one sitting on one tree. "on": a MESH_HOME whose
# identity/ holds a fresh CA and identities for every bench process (pi1..pi6, coordinator, asker), so
# every message is sealed and every HALO frame carries pair MACs; "off": the same MESH_HOME without
# identity/ (models, data and the testbed calibration are the same files), so the same code runs the
# old unauthenticated mesh. The cache bench runs SmolLM2 (Gemma-3 does not fit the Pi Zero's
# 400 MiB). Rounds alternate the order (on, off, then off, on: ABBA).
# Setup (once): for s in on off; do mkdir -p /tmp/auth-$s/testbed; ln -s ~/.cache/mesh/{data,models,gguf} /tmp/auth-$s/;
#   cp ~/.cache/mesh/testbed/calibration.json /tmp/auth-$s/testbed/; done
#   mesh identity init --home /tmp/auth-on; mesh identity issue --home /tmp/auth-on pi1 pi2 pi3 pi4 pi5 pi6
#   mesh identity issue --home /tmp/auth-on --role coordinator coordinator
#   mesh identity issue --home /tmp/auth-on --role asker asker
# A run whose JSON exists is skipped, so a stopped sitting resumes where it was.
# Usage: [TREE=dir] [OUT=dir] [FIRST=k] auth_side_by_side.sh ROUNDS [halo|cache|both]
set -uo pipefail
ROUNDS=${1:-6} WHAT=${2:-both}
HERE=$(cd "$(dirname "$0")" && pwd)
TREE=${TREE:-$(cd "$HERE/../.." && pwd)}
OUT=${OUT:-$HERE/auth}
PY=${PY:-$TREE/.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT"
run() {  # side bench round
  local side=$1 bench=$2 i=$3 out="$OUT/auth-$2-$1-$3"
  local args=(${HALO_ARGS:---loss 0,5 --no-ablation --reps 5 --mmlu 4 --ppl-tokens 32})
  [[ $bench == cache ]] && args=(--profile pi-zero-2w --model smollm2-135m --questions 4)
  [[ -s $out.json ]] && { echo "$(date -u +%H:%M:%S) have $bench $side round $i"; return; }  # a resumed sitting
  echo "$(date -u +%H:%M:%S) start $bench $side round $i (load $(cut -d' ' -f1 /proc/loadavg))"
  (cd "$TREE" && PYTHONPATH="$TREE" "$PY" -m nodes.cli bench "$bench" "${args[@]}" --home "/tmp/auth-$side" \
      --json "$out.json" --plot "$out.png" > "$out.log" 2>&1)
  echo "$(date -u +%H:%M:%S) end $bench $side round $i: exit $?"
}
pair() {  # bench round
  if (( $2 % 2 )); then run on "$1" "$2"; run off "$1" "$2"; else run off "$1" "$2"; run on "$1" "$2"; fi
}
for i in $(seq "${FIRST:-1}" "$ROUNDS"); do
  [[ $WHAT != cache ]] && pair halo "$i"
  [[ $WHAT != halo ]] && pair cache "$i"
done
