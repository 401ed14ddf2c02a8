#!/bin/bash
# old new new old: CPU seconds per role of one `bench halo --loss 0 --no-ablation`
OUT=/work/main/results/2026-12-07
for side in old new new old; do
  tree=/work/$side; n=$(ls $OUT/halo-cpu-$side-*.json 2>/dev/null | wc -l); i=$((n+1))
  echo "$(date -u +%T) start $side $i"
  (cd $tree && HF_HUB_OFFLINE=1 PYTHONPATH=$tree /work/main/.venv/bin/python /work/main/results/2026-12-07/cpu_by_process.py \
     $OUT/halo-cpu-$side-$i.json -- /work/main/.venv/bin/python -m nodes.cli bench halo --loss 0 --no-ablation \
     --json $OUT/halo-cpu-bench-$side-$i.json --plot $OUT/halo-cpu-bench-$side-$i.png > $OUT/halo-cpu-$side-$i.log 2>&1)
  echo "$(date -u +%T) end $side $i: $(tail -1 $OUT/halo-cpu-$side-$i.log)"
done
