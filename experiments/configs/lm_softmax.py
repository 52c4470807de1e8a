"""Byte-level language model with softmax attention on the embedded corpus (Python's stdlib).

Launch:
  python -m experiments.train --config lm_softmax --workdir runs/lm_softmax
  python -m experiments.evaluate --workdir runs/lm_softmax --contexts 128,512,2048 --sample 200
Smoke test (CI): add `--tiny`.

Expected cost: about 2.5 minutes on the shared 2-core CPU (measured ~3 steps/s,
  ~6,000 tokens/s, at load ~7; ~8 s compilation; 300 steps of 8 x 256 bytes).

Same model size, data, optimiser and steps as `lm_dca`; only the attention layer differs.
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _lm


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _lm.lm_config("lm_softmax", "softmax", {}, tiny=tiny)
