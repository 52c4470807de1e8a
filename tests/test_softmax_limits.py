"""SoftmaxAttention's limits: a cache overflow under jit is flagged, never a silent NaN, and a
score matrix that cannot fit is refused before anything is compiled."""

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


def test_scores_that_cannot_fit_are_refused_before_compiling():
  layer = SoftmaxAttention(64, 4, rngs=nnx.Rngs(0))
  huge = jax.ShapeDtypeStruct((1, 2**20, 64), jnp.float32)     # 2^20 tokens: 32 TiB of scores
  with pytest.raises(MemoryError, match=r"T = 1048576.*GiB"):
    jax.eval_shape(lambda x: layer(x), huge)
  with pytest.raises(MemoryError, match="S = 4194304"):
    layer.prefill(jnp.ones((1, 2**12, 64)), layer.init_cache(1, 2**22))
