"""What is particular to the `SoftmaxAttention` layer (its share of the layer contract is in
test_layers.py): its float64 oracle, its growing KV cache and what happens when it overflows."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from dca_jax.nn import SoftmaxAttention
from oracles import assert_layer_matches_oracle, cache_bytes, layer_forward, layer_prefill, normal

D_MODEL, HEADS = 32, 4


def make_layer(d_model=D_MODEL, num_heads=HEADS):
  return SoftmaxAttention(d_model, num_heads, rngs=nnx.Rngs(0))


def test_forward_matches_float64_oracle():
  assert_layer_matches_oracle(make_layer(), oracles.softmax_layer, D_MODEL)


def test_cache_grows_with_max_length():
  layer = make_layer()
  small, large = cache_bytes(layer.init_cache(2, 1024)), cache_bytes(layer.init_cache(2, 2048))
  # Keys and values: 2 rows x L x D float32 each, plus the int32 counter, each row's int32
  # document start, the bool overflow flag and a bool per row and head (doc_bad).
  fixed = 4 + 2 * 4 + 1 + 2 * HEADS
  assert small == 2 * 2 * 1024 * D_MODEL * 4 + fixed
  assert large - fixed == 2 * (small - fixed)


def test_cache_overflow():
  layer = make_layer()
  x = normal((2, 5, D_MODEL))
  with pytest.raises(ValueError, match="max_length = 4 is too small"):
    layer.prefill(x, layer.init_cache(2, 4))
  _, cache = layer_prefill(layer, x, layer.init_cache(2, 5))
  with pytest.raises(ValueError, match="max_length = 5 is too small"):
    layer.decode_step(x[:, 0], cache)

  # Under jit the position is unknown at trace time: tokens past max_length give NaN, never a
  # silently wrong number, and the tokens that fit are unaffected.
  y, _ = layer_prefill(layer, x, layer.init_cache(2, 3))
  assert np.isfinite(y[:, :3]).all() and np.isnan(y[:, 3:]).all()
  chex.assert_trees_all_close(y[:, :3], layer_forward(layer, x)[:, :3], rtol=1e-5, atol=2e-5)


def test_head_dim_must_be_even():
  with pytest.raises(ValueError, match="even for rotary"):
    make_layer(d_model=12, num_heads=4)


def test_parameter_count():
  assert oracles.param_count(make_layer(256, 4)) == 4 * 256 ** 2


# Limits: a cache overflow under jit is flagged, never a silent NaN; long sequences take the
# blocked path; a cache that cannot fit is refused before it is allocated.

def test_cache_overflow_under_jit_sets_the_flag():
  layer = SoftmaxAttention(16, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  prefill = nnx.jit(lambda model, x, cache: model.prefill(x, cache))
  y, cache = prefill(layer, x[:, :3], layer.init_cache(2, 4))
  assert not bool(cache.overflow) and np.isfinite(np.asarray(y)).all()
  y, cache = prefill(layer, x[:, 3:], cache)       # 5 tokens in a cache of 4
  assert bool(cache.overflow)
  assert np.isfinite(np.asarray(y[:, 0])).all() and np.isnan(np.asarray(y[:, 1])).all()
  y, cache = prefill(layer, x[:, :1], cache)       # every later call stays flagged and NaN
  assert bool(cache.overflow) and np.isnan(np.asarray(y)).all()
  with pytest.raises(ValueError, match="max_length"):   # eagerly, it is an error
    layer.prefill(x, layer.init_cache(2, 4))


def test_a_cache_that_cannot_fit_is_refused_before_allocating():
  layer = SoftmaxAttention(64, 4, rngs=nnx.Rngs(0))
  with pytest.raises(MemoryError, match=r"max_length = 4294967296.*GiB"):
    layer.init_cache(1, 2**32)                       # 2 TiB of keys and values


def test_long_sequences_take_the_blocked_path_with_linear_memory():
  """T = 32768 would need 32 GiB of dense scores; the blocked form's temporaries are tiny."""
  layer = SoftmaxAttention(64, 4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  compiled = fn.lower(params, jax.ShapeDtypeStruct((1, 32768, 64), jnp.float32)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30
