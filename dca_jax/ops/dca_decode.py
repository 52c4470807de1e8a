"""One decoding step of DCA on a constant-size state: `memory_state_update`.

The step costs O(W K + F V) whatever the position: the token leaving the window is folded into
the compressed memory, the new token enters the window buffer, and the output reads both
memories under one normaliser (`dca_memory.combine_memories`). Step by step it equals the
whole-sequence form `attention_compress`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks
from dca_jax.ops.dca_memory import DCAState, check_state, combine_memories, slot_positions
from dca_jax.ops.dca_params import DCAWeights, check_weights
from dca_jax.ops.rotary import rotary_frequencies


def memory_state_update(state: DCAState, weights: DCAWeights, *, rotary_base: float | None = 10000.0,
                        reset: jax.Array | None = None):
  """One decoding step of DCA with a constant-size state: O(W K + F V) work, independent of t.

  The oldest buffered token leaves the window and is folded into the compressed memory
  (M <- a_t M + phi(k_{t-W}) [v_{t-W}, 1]^T), the new token enters the window, and the output
  combines both memories under one normaliser (module docstring). Equal, step by step, to
  `attention_compress` over the whole sequence.

  Args:
    state: `DCAState` (from `init_state` or `attention_compress(..., return_state=True)`).
    weights: `DCAWeights` of one token: q, k [B, H, K], v [B, H, V], features [B, H, F],
      log_decay [B, H].
    rotary_base: as in `attention_compress` (must match it for the two to agree).
    reset: optional bool [B]; true in a row where a new document starts at this token: the
      buffered tokens and the memory of that row are no longer seen (as `attention_compress`
      with a reset at this position).

  Returns:
    (o [B, H, V] in v's dtype, new `DCAState`).

  Raises:
    ValueError / TypeError: malformed weights or a state of another shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dca_jax import init_params, init_state, compute_weights
    >>> params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=8)
    >>> state = init_state(1, 2, 16, 16, 45, 8)
    >>> o, state = memory_state_update(state, compute_weights(params, jnp.ones((1, 32))))
    >>> o.shape
    (1, 2, 16)
  """
  check_weights(weights, step=True)
  if not isinstance(state, DCAState):
    raise TypeError(f"state must be a DCAState, got {type(state).__name__}.")
  batch = weights.q.shape[0]
  check_state(state, batch, weights)
  _checks.check_step_reset(reset, batch)
  f32 = jnp.float32
  window = state.window
  key_dim, value_dim = weights.q.shape[-1], weights.v.shape[-1]

  t = state.position
  slot = t % window
  memory = state.memory
  doc_start = state.doc_start
  if reset is not None:
    # Everything buffered belongs to an earlier document now, and the memory starts empty
    # (selected away, not multiplied by 0, so a non-finite old state cannot leak).
    doc_start = jnp.where(reset, t, doc_start)
    memory = jnp.where(reset[:, None, None, None], 0.0, memory)

  # The slot about to be overwritten holds the token at t - W: it leaves the window for the
  # memory if it exists and belongs to the current document (else it adds nothing).
  leaving = ((t - window >= 0) & (t - window >= doc_start))[:, None, None]          # [B, 1, 1]
  features = jnp.where(leaving, state.key_features[:, slot], 0.0)                   # [B, H, F]
  values = jnp.concatenate([state.values[:, slot], jnp.ones((batch, weights.v.shape[-2], 1), f32)], -1)
  decay = jnp.exp(weights.log_decay.astype(f32))
  decay = decay[..., None] if decay.ndim == 3 else decay[..., None, None]   # per channel / head
  values = jnp.where(leaving, values, 0.0)
  memory = decay * memory + features[..., :, None] * values[..., None, :]

  # The new token takes that slot: one write per buffer, nothing shifts.
  keys = jax.lax.dynamic_update_index_in_dim(state.keys, weights.k.astype(f32), slot, 1)
  vals = jax.lax.dynamic_update_index_in_dim(state.values, weights.v.astype(f32), slot, 1)
  key_features = jax.lax.dynamic_update_index_in_dim(
      state.key_features, weights.k_features.astype(f32), slot, 1)

  q = weights.q.astype(f32)
  held = slot_positions(t + 1, window)                                             # [W]
  # Slots of other documents and empty ones are selected away (never multiplied by a zero
  # weight), so whatever they hold cannot reach the output.
  seen = (held[None, :] >= 0) & (held[None, :] >= doc_start[:, None])              # [B, W]
  k = jnp.where(seen[:, :, None, None], keys, 0.0)
  seen_vals = jnp.where(seen[:, :, None, None], vals, 0.0)
  # Scores and read-out as multiply-and-reduce over the slots in the buffers' own [B, W, H, .]
  # layout: a dot_general here would transpose the whole buffer every step.
  if rotary_base is None:
    scores = jnp.sum(q[:, None] * k, axis=-1)                                       # [B, W, H]
  else:
    # Slot s holds the token t - held_s steps back: its key is rotated back by that offset (the
    # relative offsets in [-(W-1), 0] of the whole-sequence form), written out for the half-split
    # pairs (k1, k2) so that neither a rotated copy of the buffer nor a per-element cos/sin is
    # formed: q . rot(k, o) = sum_i cos(o f_i) (q1 k1 + q2 k2) + sin(o f_i) (q2 k1 - q1 k2).
    # The [W, K/2] angle table is materialised first (the barrier keeps XLA from fusing the
    # transcendentals into the per-element loop over the whole buffer).
    half = key_dim // 2
    angles = (held - t).astype(f32)[:, None] * rotary_frequencies(key_dim, rotary_base)[None]
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    cos, sin = cos[None, :, None], sin[None, :, None]                                # [1, W, 1, K/2]
    q1, q2 = q[:, None, :, :half], q[:, None, :, half:]
    k1, k2 = k[..., :half], k[..., half:]
    scores = jnp.sum(cos * (q1 * k1 + q2 * k2) + sin * (q2 * k1 - q1 * k2), axis=-1)
  scores = scores / math.sqrt(key_dim)
  scores = jnp.where(seen[:, :, None], scores, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=1))   # [B, H]; the new token is always seen
  probs = jnp.exp(scores - top[:, None])
  num = jnp.sum(probs[..., None] * seen_vals, axis=1)                               # [B, H, V]
  den = jnp.sum(probs, axis=1)
  memory_out = jnp.einsum("bhf,bhfv->bhv", weights.q_features.astype(f32), memory)
  o = combine_memories(num, den, top, memory_out, value_dim, weights.gate).astype(weights.v.dtype)
  return o, DCAState(keys=keys, values=vals, key_features=key_features, doc_start=doc_start,
                     memory=memory, position=t + 1)
