"""The shared shape of the MQAR experiments (`mqar_dca`, `mqar_softmax`)."""

from __future__ import annotations

from typing import Any, Mapping

from experiments.configs import ExperimentConfig, tiny_variant


def mqar_config(name: str, attention: str, options: Mapping[str, Any], *,
                tiny: bool) -> ExperimentConfig:
  """An MQAR config at (T, P) = (256, 16), d_model 64, 2 layers; only the attention varies."""
  # Zoology's MQAR uses V = 8192; 512 keeps the [B, T, V] logits cheap on a CPU and still
  # leaves 255 keys and 256 values to draw the 16 pairs from.
  config = ExperimentConfig(
      name=name, task="mqar", d_model=64, num_layers=2, num_heads=2, attention=attention,
      attention_options=options, vocab_size=512, seq_len=256, batch_size=32, steps=1000,
      peak_lr=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
      seed=0, log_every=25, eval_every=250, eval_batches=4, checkpoint_every=250, mqar_pairs=16)
  # A small vocabulary and 4 pairs keep the CI-sized task learnable in a few steps.
  return tiny_variant(config, vocab_size=64, mqar_pairs=4, weight_decay=0.0) if tiny else config
