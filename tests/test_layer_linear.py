"""What is particular to the `LinearAttention` layer (its share of the layer contract is in
test_layers.py): its float64 oracle and its parameter count."""

from __future__ import annotations

from flax import nnx

import oracles
from dca_jax.nn import LinearAttention

D_MODEL, HEADS = 32, 4


def test_forward_matches_float64_oracle():
  oracles.assert_layer_matches_oracle(LinearAttention(D_MODEL, HEADS, rngs=nnx.Rngs(0)),
                                      oracles.linear_layer, D_MODEL)


def test_parameter_count():
  assert oracles.param_count(LinearAttention(256, 4, rngs=nnx.Rngs(0))) == 4 * 256 ** 2
