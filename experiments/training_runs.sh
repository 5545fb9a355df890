#!/usr/bin/env bash
# The training runs behind the README's result tables, on this machine; each result lands in
# experiments/results/ (result.json files name the machine). About 20 minutes on 2 CPU cores.
#   bash experiments/training_runs.sh            # everything
#   bash experiments/training_runs.sh default    # one group: default | metals | dipole | hessian
set -euo pipefail
cd "$(dirname "$0")/.."
R=experiments/results
mkdir -p "$R"
what=${1:-all}
timed() { /usr/bin/time -f "wall %e s, user %U s, system %S s, peak RSS %M kB, minor page faults %R" "$@"; }

if [[ $what == all || $what == default ]]; then
  # the main job (seed 0) and a second seed, then both test sets and a molecule never trained on
  timed equijax train --output runs/default --restart --no-progress 2>&1 | tee "$R/default_run.log"
  cp runs/default/result.json "$R/default_run.json"
  equijax evaluate runs/default/model.npz equijax/data/ethanol_test.xyz equijax/data/aspirin_test.xyz \
    equijax/data/malonaldehyde_test.xyz --output runs/default/eval | tee -a "$R/default_run.log"
  cp runs/default/eval/metrics.json "$R/default_run_eval.json"
  timed equijax train train.seed=1 --output runs/default_seed1 --restart --no-progress 2>&1 | tail -8 \
    | tee "$R/default_run_seed1.log"
  cp runs/default_seed1/result.json "$R/default_run_seed1.json"
fi
if [[ $what == all || $what == metals ]]; then
  timed equijax train metals.yaml --output runs/metals --restart --no-progress 2>&1 | tail -8 | tee "$R/metals_run.log"
  cp runs/metals/result.json "$R/metals_run.json"
  python experiments/phonons_cu.py --checkpoint runs/metals/model.npz   # cu_phonons.{json,png}
fi
if [[ $what == all || $what == dipole ]]; then
  # energies, forces and dipoles; then the vibrational validation against GFN2-xTB (parts a, b)
  timed equijax train train.weights.dipole=1.0 --output runs/dipole --restart --no-progress 2>&1 | tail -9 \
    | tee "$R/dipole_run.log"
  cp runs/dipole/result.json "$R/dipole_run.json"
  python experiments/vibrations_study.py --checkpoint runs/dipole/model.npz --parts a
  equijax vibrate runs/dipole/model.npz experiments/workloads/aspirin.xyz --relax --ir \
    --output experiments/results/aspirin_vibrations
fi
if [[ $what == all || $what == hessian ]]; then
  # (1) the first recipe, Cartesian H v (README's first table): fine-tuning of the dipole model, its control
  # without the Hessian terms (equal steps and data), and the Hessian term alone
  first="train.hessian_metric=cartesian train.weights.hessian=1.0 train.weights.dipole_derivative=1.0 train.weights.displacement=0.0"
  timed equijax train equijax/configs/hessian_finetune.yaml $first --output runs/finetune --restart --no-progress 2>&1 \
    | tail -11 | tee "$R/finetune_run.log"
  cp runs/finetune/result.json "$R/finetune_run.json"
  timed equijax train equijax/configs/hessian_finetune.yaml $first train.weights.hessian=0.0 \
    train.weights.dipole_derivative=0.0 --output runs/finetune_control --restart --no-progress 2>&1 | tail -9 \
    | tee "$R/finetune_control_run.log"
  cp runs/finetune_control/result.json "$R/finetune_control_run.json"
  equijax train equijax/configs/hessian_finetune.yaml $first train.weights.dipole_derivative=0.0 \
    --output runs/finetune_d0 --restart --no-progress 2>&1 | tail -9
  python experiments/vibrations_study.py --parts b --compare before=runs/dipole/model.npz \
    control=runs/finetune_control/model.npz after=runs/finetune/model.npz no_dmu=runs/finetune_d0/model.npz
  # (2) the Hessian term in normal modes (train.hessian_metric=frequency): the fine-tuning recipe, the same
  # without the displacement term, training from the start at 32 channels, and its control without Hessians
  equijax train equijax/configs/hessian_finetune.yaml --output runs/freq_D --restart --no-progress 2>&1 | tail -9
  equijax train equijax/configs/hessian_finetune.yaml train.weights.hessian=1.0e-4 train.weights.displacement=0.0 \
    --output runs/freq_A --restart --no-progress 2>&1 | tail -9
  timed equijax train equijax/configs/hessian_scratch.yaml --output runs/freq_E32 --restart --no-progress 2>&1 \
    | tail -11 | tee "$R/hessian_scratch_run.log"
  cp runs/freq_E32/result.json "$R/hessian_scratch_run.json"
  equijax train equijax/configs/hessian_scratch.yaml train.weights.hessian=0.0 train.weights.dipole_derivative=0.0 \
    train.weights.displacement=0.0 --output runs/scratch32_control --restart --no-progress 2>&1 | tail -9 \
    | tee "$R/hessian_scratch_control_run.log"
  python experiments/vibrations_study.py --parts b --compare scratch32_freq=runs/freq_E32/model.npz \
    finetune_freq_disp=runs/freq_D/model.npz finetune_freq=runs/freq_A/model.npz \
    scratch32_control=runs/scratch32_control/model.npz --out "$R/vibrations_study_frequency_metric.json"
  # per mode, stretches vs the rest, at both minima; ethanol's conformer; forces at GFN2-xTB's minimum
  python experiments/mode_errors.py before=runs/dipole/model.npz cartesian_finetune=runs/finetune/model.npz \
    finetune_freq=runs/freq_A/model.npz finetune_freq_disp=runs/freq_D/model.npz \
    scratch32_control=runs/scratch32_control/model.npz scratch32_freq=runs/freq_E32/model.npz
  python experiments/hessian_loss_cost.py
fi
