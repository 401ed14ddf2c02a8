#!/usr/bin/env bash
# Issue 14: the layout move side by side with the commit before it, in one sitting, alternating.
# OLD and NEW are git worktrees (e.g. `git worktree add /work/old 6712cb8`); both run on this
# repo's venv. Each round: halo old, halo new, cache new, cache old (ABBA against drift).
# Usage: layout_side_by_side.sh OLD NEW ROUNDS [halo|cache|both]
set -uo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-3} WHAT=${4:-both}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$(cd "$HERE/../.." && pwd)/.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
run() {  # tree label bench round
  local tree=$1 label=$2 bench=$3 i=$4
  local out="$HERE/layout-$bench-$label-$i"
  local args=(--loss 0,5 --no-ablation)
  [[ $bench == cache ]] && args=(--profile pi-zero-2w --questions 4)
  echo "$(date -u +%H:%M:%S) start $bench $label round $i ($(git -C "$tree" rev-parse --short HEAD))"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -m nodes.cli bench "$bench" "${args[@]}" \
      --json "$out.json" --plot "$out.png" > "$out.log" 2>&1)
  echo "$(date -u +%H:%M:%S) end $bench $label round $i: exit $?"
}
for i in $(seq 1 "$ROUNDS"); do
  if [[ $WHAT != cache ]]; then run "$OLD" old halo "$i"; run "$NEW" new halo "$i"; fi
  if [[ $WHAT != halo ]]; then run "$NEW" new cache "$i"; run "$OLD" old cache "$i"; fi
done
