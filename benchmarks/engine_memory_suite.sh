#!/usr/bin/env bash
# The rows of benchmarks/results/engine_memory_<card>_<date>.jsonl in one call: llama_3b with each
# activation-checkpointing policy in both engines (peak memory beside the planner's estimate), the
# checkpoint stall of llama_1b (async twice, then sync) in both, the 8B refusal. One process per row
# (the peak cannot be reset), each bounded by ROW_TIMEOUT seconds; rows run in the order given.
# Usage: benchmarks/engine_memory_suite.sh OUT.jsonl LOGDIR [ROW ...]   (rows: torch-none torch-full
# torch-selective jax-none jax-full jax-selective torch-save jax-save torch-refuse)
set -u
out=$1; logs=$2; shift 2
rows=${*:-torch-full torch-selective torch-save jax-none jax-full jax-selective jax-save torch-none torch-refuse}
mkdir -p "$logs"
for row in $rows; do
  backend=${row%%-*}; what=${row#*-}
  case $what in
    none|full|selective) args=(policy --config configs/llama_3b.yaml --policy "$what" --batch-size 4 --seq-len 2048);;
    save) args=(save --config configs/llama_1b.yaml --batch-size 8 --seq-len 2048 --steps 3);;
    refuse) args=(refuse --config configs/llama3_8b.yaml --batch-size 1 --seq-len 4096);;
    *) echo "unknown row $row" >&2; exit 2;;
  esac
  t0=$(date +%s)
  timeout "${ROW_TIMEOUT:-240}" python -m benchmarks.engine_memory "${args[@]}" --backend "$backend" --out "$out" \
    >"$logs/$row.log" 2>&1
  echo "$row rc=$? $(( $(date +%s) - t0 ))s"
done
