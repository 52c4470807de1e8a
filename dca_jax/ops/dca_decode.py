"""One decoding step of DCA on a constant-size state: `memory_state_update`.

The step costs O(W (K + V) + F V) whatever the position: the new token enters the window's ring
buffer (one slot written in place), the token leaving the window is folded into the compressed memory,
and the output reads both memories under one normaliser (`dca_memory.combine_memories`). Step by step it equals the
whole-sequence form `attention_compress`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks
from dca_jax.ops.dca_delta import DCADeltaState, delta_memory_state_update
from dca_jax.ops.dca_memory import (DCAState, check_state, combine_memories, step_reads,
                                    write_step)
from dca_jax.ops.dca_params import DCAWeights, check_weights
from dca_jax.ops.window import window_step_parts


def memory_state_update(state: DCAState, weights: DCAWeights, *, rotary_base: float | None = 10000.0,
                        reset: jax.Array | None = None):
  """One decoding step of DCA with a constant-size state: O(W (K + V) + F V) work, independent of t.

  The oldest buffered token leaves the window and is folded into the compressed memory
  (M <- a_t M + phi(k_{t-W}) [v_{t-W}, 1]^T), the new token enters the window, and the output
  combines both memories under one normaliser (module docstring). Equal, step by step, to
  `attention_compress` over the whole sequence.

  Args:
    state: `DCAState` (from `init_state` or `attention_compress(..., return_state=True)`); a
      `DCADeltaState` (from `init_delta_state`) runs `delta_memory_state_update` instead.
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
  if weights.beta is not None or isinstance(state, DCADeltaState):   # memory="delta"
    return delta_memory_state_update(state, weights, rotary_base=rotary_base, reset=reset)
  check_weights(weights, step=True)
  if not isinstance(state, DCAState):
    raise TypeError(f"state must be a DCAState, got {type(state).__name__}.")
  batch = weights.q.shape[0]
  check_state(state, batch, weights)
  _checks.check_step_reset(reset, batch)
  return _compiled_step(state, weights, reset, rotary_base=rotary_base)


@functools.partial(jax.jit, static_argnames=("rotary_base",))
def _compiled_step(state: DCAState, weights: DCAWeights, reset, *, rotary_base):
  """`memory_state_update` on checked inputs, as one compiled program (a token-by-token loop
  called eagerly then dispatches one program per step instead of ~50 small ones; inlined inside
  a caller's jit or scan)."""
  f32 = jnp.float32
  batch = weights.q.shape[0]
  window, value_dim = state.window, weights.v.shape[-1]

  t = state.position
  step = write_step(state, weights, weights.k_features, rotary_base, reset)
  (keys, vals, key_features), seen, new, write_due = step_reads(step, t, window, batch)

  # The token at t - W leaves the window for the memory if it exists and belongs to the current
  # document (else it adds nothing). It sits in slot (t + 1) mod (W + 1), which this step does
  # not write.
  out = (t + 1) % (window + 1)
  leaving = ((t - window >= 0) & (t - window >= step.doc_start))[:, None, None]     # [B, 1, 1]
  features = jnp.where(leaving, jax.lax.dynamic_index_in_dim(key_features, out, 2, False), 0.0)
  values = jnp.concatenate([jax.lax.dynamic_index_in_dim(vals, out, 2, False),
                            jnp.ones((batch, weights.v.shape[-2], 1), f32)], -1)
  values = jnp.where(leaving, values, 0.0)                                          # [B, H, V+1]
  decay = jnp.exp(weights.log_decay.astype(f32))
  decay = decay[..., None] if decay.ndim == 3 else decay[..., None, None]   # per channel / head
  memory = decay * step.memory + features[..., :, None] * values[..., None, :]

  num, den, top = window_step_parts(step.q, keys, vals, seen, new=new)
  memory_out = jnp.einsum("bhf,bhfv->bhv", weights.q_features.astype(f32), memory)
  o = combine_memories(num, den, top, memory_out, value_dim, weights.gate).astype(weights.v.dtype)
  if write_due:
    keys, vals, key_features = step.write(o)   # after every read: o needs them all
  return o, DCAState(keys=keys, values=vals, key_features=key_features,
                     doc_start=step.doc_start, memory=memory, position=t + 1)
