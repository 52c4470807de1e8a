"""What is particular to the `SlidingWindowAttention` layer (its share of the layer contract is in
test_layers.py): its float64 oracle and its equality with softmax attention when W >= T."""

from __future__ import annotations

import chex
import pytest
from flax import nnx

import oracles
from dca_jax.nn import SlidingWindowAttention, SoftmaxAttention
from oracles import assert_layer_matches_oracle, layer_forward, normal

D_MODEL, HEADS, WINDOW = 32, 4, 8


def make_layer(d_model=D_MODEL, num_heads=HEADS, window=WINDOW):
  return SlidingWindowAttention(d_model, num_heads, window=window, rngs=nnx.Rngs(0))


def test_forward_matches_float64_oracle():
  assert_layer_matches_oracle(
      make_layer(), lambda layer, x, reset: oracles.softmax_layer(layer, x, reset, layer.window),
      D_MODEL)


def test_window_at_least_t_is_softmax():
  """With W >= T the sliding window layer is softmax attention (same parameters)."""
  softmax = SoftmaxAttention(D_MODEL, HEADS, rngs=nnx.Rngs(0))
  window = make_layer(window=64)
  nnx.update(window, nnx.state(softmax, nnx.Param))
  x = normal((2, 20, D_MODEL))
  reset = oracles.document_reset(20, ((0, 3, 13), (0, 11)))
  chex.assert_trees_all_close(layer_forward(window, x, reset), layer_forward(softmax, x, reset),
                              rtol=1e-5, atol=2e-5)


def test_window_must_be_positive():
  with pytest.raises(ValueError, match="window must be an integer >= 1"):
    make_layer(window=0)


def test_parameter_count():
  assert oracles.param_count(make_layer(256, 4)) == 4 * 256 ** 2
