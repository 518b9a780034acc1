#!/usr/bin/env bash
# Experiment (c): the CIFAR-10 configuration (configs/contaminate/experiment/cifar10.yaml, meant for one
# GPU) as a 2-cell CPU smoke run: reference ResNet-18 + replace alpha = 0.5, tiny subsets and steps.
# CIFAR_ROOT must name the folder holding cifar-10-batches-py/: CIFAR_ROOT=/path/to/data bash $0
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
python -m simulator.contamination.cli contaminate/experiment=cifar10 contaminate/debug=smoke \
  "data.options.root=${CIFAR_ROOT:?set CIFAR_ROOT to the folder holding cifar-10-batches-py/}" device=cpu run_root=runs
# The full run, on a GPU:
#   python -m simulator.contamination.cli contaminate/experiment=cifar10 data.options.root=PATH device=cuda
