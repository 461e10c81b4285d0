#!/usr/bin/env bash
# Regenerates tests/data/golden_sweep/ from real runs, tiny ones (4 steps, validated every 2,
# a narrow network) on ColoredMNIST:
#   - GENIE + ERM, leave-one-domain-out over every target and every pair of targets (so all three
#     selection methods apply), trial seeds 0 and 1, hyper-parameter draws 0 and 1;
#   - Adam + ERM, target plus90 only, trial 0, draw 0 (a partial row: "X" cells);
#   - GENIE + ERM, single-domain generalization from plus90, trials 0 and 1.
# Only each run's results.jsonl and .hydra/overrides.yaml are kept.
#   tests/data/make_golden_sweep.sh && genie-dg collect tests/data/golden_sweep > tests/results/golden_tables.md
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=tests/data/golden_sweep
rm -rf "$OUT"
TINY=(
    trainer.max_steps=4 trainer.val_check_interval=2 dataset.batch_size=8
    'backbone.channels=[8,16,32,64]' '~callbacks.rich_progress_bar' logger=csv "hydra.sweep.dir=$OUT"
)
export WANDB_MODE=offline
.venv/bin/python train.py -m experiment=sweep_colored_mnist trial_seed=0,1 hparams_seed=0,1 "${TINY[@]}"
.venv/bin/python train.py -m experiment=sweep_colored_mnist optimizer=adam trial_seed=0 hparams_seed=0 \
    'dataset.test_domains=[plus90]' "${TINY[@]}"
.venv/bin/python train.py -m experiment=sweep_colored_mnist protocol=sdg 'dataset.train_domains=[plus90]' \
    dataset.test_domains=null trial_seed=0,1 hparams_seed=0 "${TINY[@]}"
find "$OUT" -mindepth 2 -maxdepth 2 ! -name results.jsonl ! -name .hydra -exec rm -rf {} +
find "$OUT" -path '*/.hydra/*' ! -name overrides.yaml -delete
rm -f "$OUT/multirun.yaml"
