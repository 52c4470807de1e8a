"""Tests for `dca_jax/ops/dca_memory.py`: `init_state` and the checks of a `DCAState` at the
boundary of both DCA ops."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from dca_jax import attention_compress, init_state, memory_state_update
from oracles import (BATCH, HEAD_DIM, HEADS, NUM_FEATURES, VALUE_DIM, WINDOW, step_weights,
                     weights_and_state)


@pytest.mark.parametrize("field,bad_shape", [
    ("keys", (BATCH, HEADS, WINDOW + 1, HEAD_DIM + 2)),
    ("values", (BATCH, HEADS, WINDOW + 1, VALUE_DIM + 1)),
    ("key_features", (BATCH, HEADS, WINDOW + 1, NUM_FEATURES - 1)),
    ("keys", (BATCH, WINDOW, HEADS, HEAD_DIM)),
    ("doc_start", (BATCH, WINDOW)),
    ("position", (BATCH,)),
    ("memory", (BATCH, HEADS, NUM_FEATURES, VALUE_DIM)),
    ("memory", (BATCH + 1, HEADS, NUM_FEATURES, VALUE_DIM + 1)),
])
def test_malformed_state_is_named(field, bad_shape):
  weights, state = weights_and_state()
  bad_state = state._replace(
      **{field: jnp.zeros(bad_shape, jnp.int32 if field in ("doc_start", "position") else jnp.float32)})
  with pytest.raises(ValueError, match=f"state.{field}"):
    attention_compress(weights, window=WINDOW, state=bad_state)
  with pytest.raises(ValueError, match=f"state.{field}"):
    memory_state_update(bad_state, step_weights(weights, 0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=0), "batch_size"), (dict(num_heads=0), "num_heads"),
    (dict(key_dim=-1), "key_dim"), (dict(value_dim=1.5), "value_dim"),
    (dict(feature_dim=0), "feature_dim"), (dict(window=0), "window"),
])
def test_init_state_rejects_bad_sizes(kwargs, name):
  sizes = dict(batch_size=1, num_heads=2, key_dim=4, value_dim=4, feature_dim=5, window=3)
  sizes.update(kwargs)
  with pytest.raises(ValueError, match=name):
    init_state(**sizes)
