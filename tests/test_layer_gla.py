"""What is particular to the `GatedLinearAttention` layer (its share of the layer contract is in
test_layers.py): its float64 oracle, its low-rank forget gate and its options."""

from __future__ import annotations

import pytest
from flax import nnx

import oracles
from dca_jax.nn import GatedLinearAttention

D_MODEL, HEADS = 32, 4


def make_layer(d_model=D_MODEL, num_heads=HEADS, **options):
  return GatedLinearAttention(d_model, num_heads, rngs=nnx.Rngs(0), **options)


def test_forward_matches_float64_oracle():
  oracles.assert_layer_matches_oracle(make_layer(), oracles.gla_layer, D_MODEL)


def test_parameter_count():
  gla = make_layer(256, 4)
  # The forget gate is low rank (256 -> 16 -> 128), not a full 256 x 128 matrix.
  assert gla.gate_down.kernel.shape == (256, 16)
  assert gla.gate_up.kernel.shape == (16, 128)
  assert abs(oracles.param_count(gla) / (4 * 256 ** 2) - 1) < 0.15


def test_expand_k_must_give_whole_heads():
  with pytest.raises(ValueError, match="expand_k"):
    make_layer(expand_k=0.3)
