"""Token-level forms of gated linear attention: the recurrent scan and the associative scan.

Both compute, for every batch row and head (notation: B batch, T time, H heads, K key dim,
V value dim),

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,    a_t = exp(g_t),    o_t = S_t^T q_t,

from S_0 = `s0`. They are the reference forms: one step at a time (`recurrent`, the decode path)
and a parallel prefix over tokens (`associative`, O(log T) depth but O(T K V) memory).

Internal contract shared by every form in this package (the public wrapper in `gla.py` checks
the inputs and establishes it): q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, D] with D = K (one
log decay per key channel) or D = 1 (one per head), all float32, g in [-inf, 0] with resets
already folded in as g = -inf; s0 [B, H, K, V] float32. Each form returns (o [B, T, H, V],
S_T [B, H, K, V]), both float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.ops.rowwise import scale_rows


def combine_decayed_states(earlier, later):
  """Associative combine of two segments of the recurrence S -> diag(a) S + U.

  A segment is summarised by (a, U): applying it maps a state S to a * S + U (a broadcasts over
  the value axis). Applying `earlier` then `later` gives a2 * (a1 * S + U1) + U2, so

      (a1, U1) o (a2, U2) = (a2 * a1, a2 * U1 + U2).

  The operation is associative (it is composition of affine maps), which is what lets
  `jax.lax.associative_scan` evaluate all prefixes in O(log T) depth. Decays are kept in linear
  space: they lie in [0, 1], so products can only underflow to 0, which is the correct limit.

  Args:
    earlier: (a1, U1), a1 of shape [..., D, 1] (D = K or 1) and U1 of shape [..., K, V].
    later: (a2, U2), same shapes.

  Returns:
    The pair (a, U) summarising both segments, same shapes.
  """
  a1, u1 = earlier
  a2, u2 = later
  # a2 scales the rows of U1 (rowwise.scale_rows: its gradient with respect to a2 is a dot
  # rather than a reduce-of-multiply, slow on XLA:CPU).
  if a2.shape[-2] == 1:     # one decay per head
    flat = u1.reshape(u1.shape[:-2] + (u1.shape[-2] * u1.shape[-1],))
    scaled = scale_rows(flat, a2[..., 0, 0]).reshape(u1.shape)
  else:
    scaled = scale_rows(u1, a2[..., 0])
  return a2 * a1, scaled + u2


def recurrent(q, k, v, g, s0):
  """Recurrent form: `jax.lax.scan` over tokens with a [B, H, K, V] float32 carry.

  Cost O(T K V) time, O(K V) live state; autodiff stores one state per token.
  """
  def step(state, inputs):
    q_t, k_t, v_t, g_t = inputs
    state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

  time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v, g)]
  final, o = jax.lax.scan(step, s0, time_major)
  return jnp.swapaxes(o, 0, 1), final


def associative(q, k, v, g, s0):
  """Associative form: `jax.lax.associative_scan` of `combine_decayed_states` over tokens.

  Every prefix state S_t is materialised ([B, T, H, K, V]), so memory is O(T K V): this form
  exists for parallel hardware and short sequences, and as an independent check of the others.
  """
  decay = jnp.exp(g)[..., None]                                # [B, T, H, D, 1]
  update = k[..., :, None] * v[..., None, :]                   # [B, T, H, K, V]
  cum_decay, cum_update = jax.lax.associative_scan(combine_decayed_states, (decay, update), axis=1)
  states = cum_decay * s0[:, None] + cum_update                # S_t for t = 1..T
  o = jnp.einsum("bthk,bthkv->bthv", q, states)
  return o, states[:, -1]
