"""Multi-query associative recall with Gated DeltaNet: (T, P) = (256, 16), d_model 64, 2 layers.

Launch:
  python -m experiments.train --config mqar_gated_deltanet --workdir runs/mqar_gated_deltanet
  python -m experiments.evaluate --workdir runs/mqar_gated_deltanet --contexts 256,512
Smoke test (CI): add `--tiny`.

Expected cost: not measured yet (the layer's forward runs the delta rule's recurrent form on
CPU, its gradient the chunked one; expect the order of `mqar_dca`).

The delta-rule baseline for `mqar_dca` (same model otherwise). DCA with a delta-rule memory is
`mqar_dca` with `--set attention_options.memory=delta`.
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _mqar


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _mqar.mqar_config("mqar_gated_deltanet", "gated_deltanet", {}, tiny=tiny)
