#!/bin/bash
# One downstream worker: works through the plans in order, sharing them with any other worker
# (finetune.py --plan skips runs another live process holds). Run from the repository root; start it twice
# on a 2-core machine (each plan runs finetune.py with --threads 1). Rerun to continue a cut-off plan.
#   a: MiniLM, MiniMoE 1,4E, MiniLM w/ TA (and the teacher) on STS-B, MRPC, CoLA, RTE, seed 1
#   b: CoNLL-2003 for MiniLM and MiniMoE 1,4E, and the two controls of plan c
#   c: controls: a randomly initialised 3L-384H student, and MiniMoE 1,4E compressed to rank-64 experts
#   d: seeds 2 and 3 of MiniLM and MiniMoE 1,4E;  e: the study's other students
#   f: SST-2 for MiniLM and MiniMoE 1,4E, cut to one epoch (67k examples, ~15 min a run here)
#   g: seeds 2 and 3 of the rank-64 control;  h: seeds 2 and 3 of MiniLM w/ TA and of the random-init control
#   i: SST-2, the one task here the students learn: the random-init control, and seed 2;  j: its seed 3
#   k: seeds 2 and 3 of the study's other students;  l: seeds 2 and 3 of the teacher
#   m: CoNLL-2003 for the teacher, MiniLM w/ TA and the study's other students, one seed
# Order: a b c d f i g e h k j l m (what the claims need first).
# The students are the study's (results/study); the rank-64 one is written by
#   python eval.py --compress /work/study/r1/moe4/student --rank 64 --basis per_expert --out /work/study/compressed/moe4_r64
set -e
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
if [ ! -e /work/study/random/student/config.json ]; then  # the random-init control: MiniLM's config, seed 776
  python -c "import torch, minimoe as mm; src = '/work/study/r1/minilm/student'; torch.manual_seed(776)
mm.save_bert(mm.Bert(mm.load_bert(src).config), '/work/study/random/student', tokenizer=mm.load_tokenizer(src))"
fi
for plan in a b c d f i g e h k j l m; do
  python finetune.py --plan results/downstream/plan_$plan.json
done
