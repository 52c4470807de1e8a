"""The blocked (flash-style) causal softmax equals jax.nn.dot_product_attention, forward and
gradients, with documents, awkward lengths and as a prefill after cached keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from dca_jax import blocked_causal_attention, document_ids

TOL = dict(rtol=1e-5, atol=1e-5)


def _reference(q, k, v, doc, scale):
  time = q.shape[1]
  mask = jnp.tril(jnp.ones((time, time), bool))[None] & (doc[:, :, None] == doc[:, None, :])
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)


# CI: an awkward small block and the largest one; the full job all four.
@pytest.mark.parametrize("time,block", oracles.ci_cases([(1, 4), (37, 8), (128, 32), (131, 64)],
                                                       keep=(1, 3)))
def test_equals_dot_product_attention_forward_and_gradients(time, block):
  keys = jax.random.split(jax.random.key(time), 4)
  q, k = (jax.random.normal(keys[i], (2, time, 3, 8)) for i in range(2))
  v = jax.random.normal(keys[2], (2, time, 3, 8))    # dot_product_attention needs V = K
  doc = document_ids(jax.random.bernoulli(keys[3], 0.05, (2, time)))
  scale = 8 ** -0.5
  blocked = jax.jit(lambda q, k, v: blocked_causal_attention(q, k, v, scale=scale, doc=doc,
                                                             block=block))
  reference = lambda q, k, v: _reference(q, k, v, doc, scale)
  np.testing.assert_allclose(blocked(q, k, v), reference(q, k, v), **TOL)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(jax.jit(lambda: loss(blocked))(), loss(reference)):
    np.testing.assert_allclose(got, want, **TOL)


def test_prefill_after_cached_keys_equals_the_whole_sequence():
  time, cached = 90, 33
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(keys[i], (1, time, 2, 4)) for i in range(3))
  doc = jnp.zeros((1, time), jnp.int32)
  out = blocked_causal_attention(q[:, cached:], k, v, scale=0.5, doc=doc[:, cached:], key_doc=doc,
                                 q_start=jnp.int32(cached), block=16)
  np.testing.assert_allclose(out, _reference(q, k, v, doc, 0.5)[:, cached:], **TOL)
