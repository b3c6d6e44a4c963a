set -e
cd "$(dirname "$0")/../../.."
for mode in "--position-mode global --kv-mode exact" "--position-mode global --kv-mode approx" "--position-mode compact --kv-mode exact"; do
  .venv/bin/mc-jax score --input experiments/data/kjv_genesis.txt --budget 512 --policy recency --max-tokens 4096 --json $mode 2>/dev/null | tail -1
done
