"""Multi-query associative recall with softmax attention: (T, P) = (256, 16), d_model 64, 2 layers.

Launch:
  python -m experiments.train --config mqar_softmax --workdir runs/mqar_softmax
  python -m experiments.evaluate --workdir runs/mqar_softmax --contexts 256,512
Smoke test (CI): add `--tiny`.

Expected cost: about 13 minutes on the shared 2-core CPU (measured ~1.3 steps/s
  at load ~8; 1000 steps of 32 x 256 tokens).

The full-attention reference for `mqar_dca` (same model otherwise).
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _mqar


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _mqar.mqar_config("mqar_softmax", "softmax", {}, tiny=tiny)
