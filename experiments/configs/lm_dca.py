"""Byte-level language model with DCA attention on the embedded corpus (Python's stdlib).

Launch:
  python -m experiments.train --config lm_dca --workdir runs/lm_dca
  python -m experiments.evaluate --workdir runs/lm_dca --contexts 128,512,2048 --sample 200
Smoke test (CI): add `--tiny`.

Expected cost: about 5 minutes on the shared 2-core CPU (measured ~1.25 steps/s,
  ~2,600 tokens/s, at load ~7; ~25 s compilation; 300 steps of 8 x 256 bytes), 0.43 M params.

Same model size, data, optimiser and steps as `lm_softmax`; only the attention layer differs.
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _lm


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _lm.lm_config("lm_dca", "dca", {"window": 64, "feature_dim": 8}, tiny=tiny)
