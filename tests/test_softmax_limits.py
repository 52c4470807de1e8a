"""SoftmaxAttention's limits: a cache overflow under jit is flagged, never a silent NaN; long
sequences take the blocked path; a cache that cannot fit is refused before it is allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dca_jax.nn import SoftmaxAttention


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
