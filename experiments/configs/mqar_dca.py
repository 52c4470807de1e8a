"""Multi-query associative recall with DCA attention: (T, P) = (256, 16), d_model 64, 2 layers.

Launch:
  python -m experiments.train --config mqar_dca --workdir runs/mqar_dca
  python -m experiments.evaluate --workdir runs/mqar_dca --contexts 256,512
Smoke test (CI): add `--tiny`.

Expected cost: about 25 minutes on the shared 2-core CPU (measured ~0.7 steps/s at
  load ~8; 1000 steps of 32 x 256 tokens); `--set steps=300` for a quick look.

The exact window (32) is shorter than most key-query distances, so recall must come through the
compressed memory; compare with `mqar_softmax` (same model otherwise).
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _mqar


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _mqar.mqar_config("mqar_dca", "dca", {"window": 32, "feature_dim": 16}, tiny=tiny)
