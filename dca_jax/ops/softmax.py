"""Masked softmax attention over explicit keys: the exact baseline's computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.ops import segments


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float) -> jax.Array:
  """softmax(scale q k^T, masked) v, in float32.

  Args:
    q: [B, T, H, K].
    k: [B, T_k, H, K], T_k keys.
    v: [B, T_k, H, V].
    mask: bool, broadcastable to [B, T, T_k]; true where query t may see key s. Every query must
      see at least one key.
    scale: score multiplier.

  Returns:
    [B, T, H, V] float32; NaN exactly for the queries that see a non-finite key or value (or
    are not finite themselves): masked inputs never change an output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> causal = jnp.tril(jnp.ones((4, 4), bool))[None]
    >>> masked_attention(q, k, v, causal, 8 ** -0.5).shape
    (1, 4, 2, 8)
  """
  f32 = jnp.float32
  q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
  # Non-finite inputs are zeroed (a select) and the queries that can see one set to NaN at the
  # end: a masked key or value must not change an output through 0 x NaN.
  bad_q = segments.nonfinite(q)                                          # [B, T, H]
  bad_kv = segments.nonfinite(k) | segments.nonfinite(v)                 # [B, T_k, H]
  q, = segments.zero_where(bad_q, q)
  k, v = segments.zero_where(bad_kv, k, v)
  seen = jnp.einsum("bts,bsh->bth", jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1])
                                                     ).astype(f32), bad_kv.astype(f32))
  poisoned = (seen > 0) | bad_q
  return jnp.where(poisoned[..., None], jnp.nan, attend_finite(q, k, v, mask, scale))


def attend_finite(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  scale: float) -> jax.Array:
  """`masked_attention` for inputs the caller knows to be finite (no selection, no NaN marks).

  Internal: for callers that sanitise once what they store (the softmax layer's KV cache), so a
  decode step does not re-scan the whole cache.
  """
  f32 = jnp.float32
  q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
  scores = jnp.einsum("bthk,bshk->bhts", q, k) * scale
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  # The max only stabilises the exponentials; the softmax does not depend on it.
  m = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  probs = jnp.exp(scores - m)
  out = jnp.einsum("bhts,bshv->bthv", probs, v)
  return out / jnp.swapaxes(probs.sum(-1), 1, 2)[..., None]
