"""The shared shape of the MQAR experiments (`mqar_dca`, `mqar_softmax`)."""

from __future__ import annotations

from typing import Any, Mapping

from experiments.configs import ExperimentConfig


def mqar_config(name: str, attention: str, options: Mapping[str, Any], *,
                tiny: bool) -> ExperimentConfig:
  """An MQAR config at (T, P) = (256, 16), d_model 64, 2 layers; only the attention varies."""
  if tiny:
    small = {k: min(v, 8) for k, v in options.items() if k in ("window", "feature_dim")}
    return ExperimentConfig(
        name=name, task="mqar", d_model=32, num_layers=1, num_heads=2, attention=attention,
        attention_options={**options, **small}, vocab_size=64, seq_len=32, batch_size=4,
        steps=4, peak_lr=3e-3, warmup_steps=1, weight_decay=0.0, log_every=1, eval_every=2,
        eval_batches=2, checkpoint_every=2, mqar_pairs=4)
  # Zoology's MQAR uses V = 8192; 512 keeps the [B, T, V] logits cheap on a CPU and still
  # leaves 255 keys and 256 values to draw the 16 pairs from.
  return ExperimentConfig(
      name=name, task="mqar", d_model=64, num_layers=2, num_heads=2, attention=attention,
      attention_options=options, vocab_size=512, seq_len=256, batch_size=32, steps=1000,
      peak_lr=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
      seed=0, log_every=25, eval_every=250, eval_batches=4, checkpoint_every=250, mqar_pairs=16)
