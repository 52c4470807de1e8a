"""Byte-level language model with Gated DeltaNet on the embedded corpus (Python's stdlib).

Launch:
  python -m experiments.train --config lm_gated_deltanet --workdir runs/lm_gated_deltanet
  python -m experiments.evaluate --workdir runs/lm_gated_deltanet --contexts 128,512,2048
Smoke test (CI): add `--tiny`.

Expected cost: not measured yet (300 steps of 8 x 256 bytes; expect the order of `lm_dca`).

Same model size, data, optimiser and steps as `lm_dca`; only the attention layer differs. DCA
with a delta-rule memory is `lm_dca` with `--set attention_options.memory=delta`.
"""

from __future__ import annotations

from experiments.configs import ExperimentConfig
from experiments.configs import _lm


def get_config(tiny: bool = False) -> ExperimentConfig:
  """The experiment's config; `tiny` gives the CI-sized variant (seconds)."""
  return _lm.lm_config("lm_gated_deltanet", "gated_deltanet", {}, tiny=tiny)
