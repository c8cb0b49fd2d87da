#!/bin/bash
# One downstream worker for the budget study's final students (51,200 pairs): the cuts of
# results/downstream (--protocol authors, 3 epochs, a dev evaluation every 100 steps). Run from the
# repository root once the distillation has finished; start it twice on a 2-core machine (each run has
# --threads 1; finetune.py --plan skips runs another live process holds). Rerun to continue a cut-off plan.
#   1: seed 1 of MRPC, STS-B, RTE, CoLA and CoNLL-2003;  2: seeds 2 and 3 of the four GLUE tasks
# The students are those of the run in results/README.md section 2 (its --out_dir is in the plans).
set -e
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
for plan in 1 2; do
  python finetune.py --plan results/budget/downstream/plan_$plan.json
done
