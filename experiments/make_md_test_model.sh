#!/usr/bin/env bash
# The small trained ethanol model shipped for MD demos and tests (equijax/data/ethanol_md_model.npz):
# NequIP l_max=1, 8 channels, 2 layers, 4 Å cutoff (float32; tests also run it in float64), trained on the bundled GFN2-xTB ethanol frames.
# A trained model, not a random one: NVE drift and thermostat tests need a physical potential surface.
# About a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/ethanol_md_model}
equijax train --restart --no-progress --output "$out" \
  'data.train=[data/ethanol_train.xyz]' 'data.test=[data/ethanol_test.xyz]' \
  model.l_max=1 model.channels=8 model.n_layers=2 model.cutoff=4.0 'model.radial_hidden=[16]' \
  train.max_steps=1000 train.eval_every=100 train.batch_size=8
cp "$out/model.npz" equijax/data/ethanol_md_model.npz
