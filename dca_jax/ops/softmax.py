"""Masked softmax attention over explicit keys: the exact baseline's computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float) -> jax.Array:
  """softmax(scale q k^T, masked) v, in float32.

  Args:
    q: [B, T, H, K].
    k: [B, S, H, K].
    v: [B, S, H, V].
    mask: bool, broadcastable to [B, T, S]; true where query t may see key s. Every query must
      see at least one key.
    scale: score multiplier.

  Returns:
    [B, T, H, V] float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> causal = jnp.tril(jnp.ones((4, 4), bool))[None]
    >>> masked_attention(q, k, v, causal, 8 ** -0.5).shape
    (1, 4, 2, 8)
  """
  f32 = jnp.float32
  scores = jnp.einsum("bthk,bshk->bhts", q.astype(f32), k.astype(f32)) * scale
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  # The max only stabilises the exponentials; the softmax does not depend on it.
  m = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  probs = jnp.exp(scores - m)
  out = jnp.einsum("bhts,bshv->bthv", probs, v.astype(f32))
  return out / jnp.swapaxes(probs.sum(-1), 1, 2)[..., None]
