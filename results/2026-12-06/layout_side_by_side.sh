#!/usr/bin/env bash
# Issue 14: the layout move side by side with the commit before it, in one sitting, alternating.
# OLD and NEW are git worktrees (e.g. `git worktree add /work/old 6712cb8`); both run on this
# repo's venv. Rounds alternate the order (old, new, then new, old: ABBA), so a drift of the
# machine over the sitting, or anything one run leaves behind for the next, favours neither side.
# Usage: [FIRST=k] [ORDER=abba|old|new] [OUT=dir] layout_side_by_side.sh OLD NEW ROUNDS [halo|cache|both]
# (OUT: where the runs go, default beside this script; 2026-12-07's sitting used OUT=results/2026-12-07)
# (rounds FIRST..ROUNDS; ORDER=new runs new first in every round, to balance rounds run old-first)
# (HALO_ARGS: the halo bench's options instead of the issue's `--loss 0,5 --no-ablation`)
set -uo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-3} WHAT=${4:-both}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE}
PY=${PY:-$(cd "$HERE/../.." && pwd)/.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
run() {  # tree label bench round
  local tree=$1 label=$2 bench=$3 i=$4
  local out="$OUT/layout-$bench-$label-$i"
  local args=(${HALO_ARGS:---loss 0,5 --no-ablation})
  [[ $bench == cache ]] && args=(--profile pi-zero-2w --questions 4)
  echo "$(date -u +%H:%M:%S) start $bench $label round $i ($(git -C "$tree" rev-parse --short HEAD))"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -m nodes.cli bench "$bench" "${args[@]}" \
      --json "$out.json" --plot "$out.png" > "$out.log" 2>&1)
  local rc=$?
  echo "$(date -u +%H:%M:%S) end $bench $label round $i: exit $rc"
}
pair() {  # bench round
  local order=${ORDER:-abba}
  [[ $order == abba ]] && { (( $2 % 2 )) && order=old || order=new; }
  if [[ $order == old ]]; then run "$OLD" old "$1" "$2"; run "$NEW" new "$1" "$2"
  else run "$NEW" new "$1" "$2"; run "$OLD" old "$1" "$2"; fi
}
for i in $(seq "${FIRST:-1}" "$ROUNDS"); do
  [[ $WHAT != cache ]] && pair halo "$i"
  [[ $WHAT != halo ]] && pair cache "$i"
done
