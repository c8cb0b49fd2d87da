#!/bin/bash
# One downstream worker: works through the plans in order, sharing them with any other worker
# (finetune.py --plan skips runs another live process holds). Run from the repository root; start it twice
# on a 2-core machine (each plan runs finetune.py with --threads 1). Rerun to continue a cut-off plan.
set -e
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
for plan in a b c d; do
  python finetune.py --plan results/downstream/plan_$plan.json
done
