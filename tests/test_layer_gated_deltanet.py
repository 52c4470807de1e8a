"""What is particular to the `GatedDeltaNet` layer (its share of the layer contract is in
test_layers.py): its float64 oracle on awkward shapes, its engine forms agreeing in value and
gradient, its options and their errors."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from dca_jax.nn import GatedDeltaNet, SoftmaxAttention
from oracles import module_jit, normal, randomize

D_MODEL, HEADS = 32, 4


def make_layer(d_model=D_MODEL, num_heads=HEADS, seed=0, **options):
  layer = GatedDeltaNet(d_model, num_heads, rngs=nnx.Rngs(seed), **options)
  # A data-dependent decay and a convolution that mixes neighbours, so that both matter.
  return randomize(layer, (("decay", 0.5 / math.sqrt(d_model)), ("conv", 0.5)), seed)


# T = 1; T prime and not a multiple of the chunk (13 = 3 chunks of 4 + 1), without the
# convolution and with K = V; T = 20 past nothing in particular, with the defaults (recurrent when
# evaluated on CPU). Row 0 holds documents of 3, 10 and 7 tokens (fewer when T is shorter).
@pytest.mark.parametrize("time,options", [
    (1, {}), (13, dict(mode="chunked", chunk_size=4, short_conv=0, expand_k=1.0)), (20, {})],
    ids=["T1", "T13-chunked4-noconv-K=V", "T20"])
def test_forward_matches_float64_oracle(time, options):
  oracles.assert_layer_matches_oracle(make_layer(**options), oracles.gated_deltanet_layer, D_MODEL,
                                      time=time)


@pytest.mark.slow
def test_forward_matches_float64_oracle_at_a_real_size():
  """H = 4 heads of K = 64 keys (V = 128) over T = 128 tokens, chunked."""
  layer = make_layer(512, 4, mode="chunked", chunk_size=32)
  assert layer.key_dim == 64
  oracles.assert_layer_matches_oracle(layer, oracles.gated_deltanet_layer, 512, time=128,
                                      starts=(0, 50), rtol=1e-4, atol=1e-4)


FORMS = (dict(mode="recurrent"), dict(mode="chunked", chunk_size=4))


def test_engine_forms_agree_in_value_and_gradient():
  """The recurrent form and the chunked one (T = 11: 2 chunks of 4 + 3), across a reset."""
  x = normal((2, 11, D_MODEL))
  reset = oracles.document_reset(11, ((0, 6), (0,)))
  cotangent = normal((2, 11, D_MODEL), seed=3)

  def loss(layer):
    return jnp.sum(layer(x, reset=reset) * cotangent)

  results = []
  for options in FORMS:
    layer = make_layer(**options)
    results.append(module_jit(nnx.value_and_grad(loss))(layer))
  (ref_value, ref_grad) = results[0]
  ref_grad = nnx.state(ref_grad, nnx.Param)
  for options, (value, grad) in zip(FORMS[1:], results[1:]):
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg=str(options))
    grad = nnx.state(grad, nnx.Param)
    for leaf in jax.tree.leaves(grad):
      assert np.isfinite(np.asarray(leaf)).all(), options
    chex.assert_trees_all_close(grad, ref_grad, rtol=1e-4, atol=1e-5, custom_message=str(options))


def test_parameter_count_is_close_to_softmax():
  layer = nnx.eval_shape(lambda: GatedDeltaNet(256, 4, rngs=nnx.Rngs(0)))
  softmax = oracles.param_count(nnx.eval_shape(lambda: SoftmaxAttention(256, 4, rngs=nnx.Rngs(0))))
  count = oracles.param_count(layer)
  assert count == 4 * 256 ** 2 + 2 * 256 * 4 + 4 + 64 + 2 * 4 * 256
  assert softmax < count < 1.03 * softmax


def test_heads_start_at_spread_half_lives():
  layer = GatedDeltaNet(D_MODEL, HEADS, min_half_life=8.0, max_half_life_ratio=8.0,
                        rngs=nnx.Rngs(0))
  rate = np.asarray(jax.nn.softplus(layer.decay_bias[...]))
  np.testing.assert_allclose(math.log(2.0) / rate, [8.0, 16.0, 32.0, 64.0], rtol=1e-5)


def test_state_and_cache_shapes():
  build = lambda **o: nnx.eval_shape(lambda: GatedDeltaNet(D_MODEL, HEADS, rngs=nnx.Rngs(0), **o))
  cache = build().init_cache(2, 1 << 20)
  assert cache.state.state.shape == (2, HEADS, D_MODEL // HEADS // 2, D_MODEL // HEADS)
  assert cache.inputs.shape == (2, 3, 2 * D_MODEL)
  assert type(build(short_conv=0).init_cache(2, 8)).__name__ == "RecurrentCache"


@pytest.mark.parametrize("options,match", [
    (dict(expand_k=0.3), r"expand_k must make .* got expand_k = 0.3"),
    (dict(short_conv=-1), r"short_conv must be an integer >= 0 .* got -1"),
    (dict(short_conv=2.0), r"short_conv must be an integer >= 0 .* got 2.0"),
    (dict(min_half_life=0.0), r"min_half_life must be a finite number > 0 .* got 0.0"),
    (dict(max_half_life_ratio=0.5), r"max_half_life_ratio must be a finite number >= 1, got 0.5"),
    (dict(mode="fast"), r"mode"),
    (dict(chunk_size=0), r"chunk_size must be an integer >= 1, got 0"),
])
def test_bad_options_name_the_argument(options, match):
  with pytest.raises(ValueError, match=match):
    GatedDeltaNet(D_MODEL, HEADS, rngs=nnx.Rngs(0), **options)


def test_conv_cache_of_another_layer_is_refused():
  layer, no_conv, narrow = (nnx.eval_shape(lambda s=s: GatedDeltaNet(D_MODEL, HEADS, short_conv=s,
                                                                     rngs=nnx.Rngs(0)))
                            for s in (4, 0, 2))
  x = normal((2, D_MODEL))
  with pytest.raises(TypeError, match="ConvCache"):
    layer.decode_step(x, no_conv.init_cache(2, 8))
  with pytest.raises(ValueError, match="another configuration"):
    layer.decode_step(x, narrow.init_cache(2, 8))
