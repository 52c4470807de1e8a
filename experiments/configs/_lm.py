"""The shared shape of the byte-level LM experiments (`lm_dca`, `lm_softmax`)."""

from __future__ import annotations

from typing import Any, Mapping

from experiments.configs import ExperimentConfig, tiny_variant


def lm_config(name: str, attention: str, options: Mapping[str, Any], *,
              tiny: bool) -> ExperimentConfig:
  """A byte-level LM config on the default corpus; only the attention layer varies."""
  config = ExperimentConfig(
      name=name, task="lm", d_model=128, num_layers=2, num_heads=4, attention=attention,
      attention_options=options, seq_len=256, batch_size=8, steps=300, peak_lr=3e-3,
      warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, seed=0,
      log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100)
  return tiny_variant(config) if tiny else config
