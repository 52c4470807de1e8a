"""Sequence parallelism for the engine: T sharded over a named mesh axis (inside `jax.shard_map`).

A linear recurrence S_t = diag(a_t) S_{t-1} + k_t v_t^T splits over contiguous shards of the
sequence (notation: B batch, T local length, H heads, K key dim, V value dim, D = K or 1 decay
channels, N shards along `axis_name`):

1. every shard runs its own tokens from a zero state (any engine form): local outputs o' and
   its segment summary, the affine map S -> diag(A) S + U of the whole shard (A = exp of the sum
   of its log decays, U = the local final state);
2. one `all_gather` of the summaries, N x (D + K V) numbers per row and head: the traffic does not
   depend on T;
3. every shard folds the summaries of the shards before it, from the initial state, into the
   state S_in that enters it, and adds what S_in contributes to its outputs:
       o_t = o'_t + (exp(G_t) * q_t)^T S_in,     G_t = sum of the shard's log decays up to t;
   the fold over all N summaries is the final state S_T, the same on every shard.

This is the scheme of LASP-2 (Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for
Linear Attention and Its Hybrid") for a decayed matrix state; recurrentgemma's multi-shard scan
makes the same correction for a vector state. Resets are decays of -inf, so a reset anywhere in
a shard cuts the carried state from that token on, at a boundary as well as inside.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import jax.numpy as jnp


def check_axis_name(axis_name: Hashable) -> int:
  """The size of mesh axis `axis_name`; a clear error when it is not bound here.

  Raises:
    ValueError: `axis_name` is not a mesh axis of an enclosing `jax.shard_map` (or `pmap`).
  """
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as error:
    raise ValueError(
        f"axis_name={axis_name!r} is not a mesh axis bound here: call with axis_name inside "
        f"jax.shard_map over a mesh that has that axis, with the T axis of q, k, v, log_decay "
        f"(and reset) sharded over it; axis_name=None runs on one device.") from error


def _combine(earlier, later):
  """`scan.combine_decayed_states` where a zero decay erases the carried state even when it is
  not finite (a reset ends what a corrupt earlier shard could reach)."""
  a1, u1 = earlier
  a2, u2 = later
  return a2 * a1, jnp.where(a2 > 0, a2 * u1, 0.0) + u2


def _apply(a: jax.Array, u: jax.Array, state: jax.Array) -> jax.Array:
  return jnp.where(a > 0, a * state, 0.0) + u


def combine_shards(o: jax.Array, local_final: jax.Array, q: jax.Array, g: jax.Array,
                   s0: jax.Array, axis_name: Hashable) -> tuple[jax.Array, jax.Array]:
  """Steps 2-3 of the module docstring for one shard.

  Args:
    o: [B, T, H, V] float32 local outputs (from a zero state).
    local_final: [B, H, K, V] float32 local final state (from a zero state).
    q: [B, T, H, K] float32 queries (non-finite entries already handled by the local run).
    g: [B, T, H, D] float32 log decays with resets folded in as -inf.
    s0: [B, H, K, V] float32 state entering shard 0.
    axis_name: the mesh axis T is sharded over.

  Returns:
    (o [B, T, H, V], S_T [B, H, K, V]), float32; S_T is the whole sequence's final state.
  """
  g = jnp.where(jnp.isnan(g), 0.0, g)
  within = jnp.cumsum(g, axis=1)                                        # G_t, in [-inf, 0]
  decays = jax.lax.all_gather(jnp.exp(within[:, -1]), axis_name)        # [N, B, H, D]
  states = jax.lax.all_gather(local_final, axis_name)                   # [N, B, H, K, V]
  # Prefix summaries over the shards: shard j's (A, U) composed with every one before it.
  cum_decay, cum_state = jax.lax.associative_scan(_combine, (decays[..., None], states), axis=0)
  index = jax.lax.axis_index(axis_name)
  before = jnp.maximum(index - 1, 0)
  s_in = jnp.where(index > 0, _apply(cum_decay[before], cum_state[before], s0), s0)
  final = _apply(cum_decay[-1], cum_state[-1], s0)
  # Every shard holds the same final state; a psum of it from one shard says so to shard_map
  # (an invariant value, so out_specs=P() is accepted with check_vma on).
  final = jax.lax.psum(jnp.where(index == 0, final, 0.0), axis_name)
  weights = jnp.exp(within)                                             # [B, T, H, D]
  finite = jnp.isfinite(s_in)
  correction = jnp.einsum("bthk,bhkv->bthv", weights * q, jnp.where(finite, s_in, 0.0))
  # A non-finite carried state poisons exactly the outputs it reaches (weight > 0).
  reached = jnp.any(weights > 0, axis=-1) & ~jnp.all(finite, axis=(-2, -1))[:, None]
  return jnp.where(reached[..., None], jnp.nan, o + correction), final


def folded_log_decay(log_decay: jax.Array, reset: jax.Array | None) -> jax.Array:
  """float32 [B, T, H, D] log decays (D = 1 for one per head) with resets folded in as -inf, as
  the engine runs them (`combine_shards`'s g)."""
  g = log_decay.astype(jnp.float32)
  g = g[..., None] if g.ndim == 3 else g
  if reset is not None:
    g = jnp.where(reset[:, :, None, None], -jnp.inf, g)
  return g


def _varying_axes(x: Any) -> frozenset:
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  return frozenset(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))


def match_varying(x: jax.Array, *like: Any) -> jax.Array:
  """`x` typed as varying over every mesh axis that any of `like` varies over (a no-op outside
  `jax.shard_map`): a replicated parameter that enters a custom_vjp beside per-device inputs
  (batch or sequence shards) must, for its gradient's type to match, and so must a scan's initial
  carry (a zero state made inside the shard) whose body mixes in per-device inputs."""
  wanted = frozenset().union(*(_varying_axes(y) for y in like))
  missing = tuple(sorted(wanted - _varying_axes(x), key=str))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def varying(x: jax.Array, axis_name: Hashable, like: Any = None) -> jax.Array:
  """`x` typed as varying over `axis_name`, and over every mesh axis that `like` varies over
  (what a scan carry or a custom_vjp argument that meets per-shard values must be under
  shard_map's check_vma: with T sharded over "seq" and the batch over "data", the inputs vary
  over both); unchanged where it already does."""
  wanted = {axis_name} | (_varying_axes(like) if like is not None else set())
  missing = tuple(sorted(wanted - _varying_axes(x), key=str))
  if not missing:
    return x
  return jax.lax.pcast(x, missing, to="varying")


def zeros_state(batch: int, heads: int, key_dim: int, value_dim: int,
                initial_state: Any) -> jax.Array:
  if initial_state is None:
    return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  return initial_state.astype(jnp.float32)


def previous_tail(arrays, count: int, axis_name: Hashable) -> list[jax.Array]:
  """The last `count` positions of each of `arrays` ([B, T, ...]) on the previous shard, by one
  `ppermute` each (zeros on the first shard): the halo of a window of `count` tokens.

  Raises:
    ValueError: `count` is more than the shard's length T, naming both.
  """
  shards = check_axis_name(axis_name)
  time = arrays[0].shape[1]
  if count > time:
    raise ValueError(
        f"window={count} is longer than this shard's {time} tokens (T sharded over {shards} "
        f"shards along {axis_name!r}): the window would need tokens from more than one shard "
        f"before; use fewer shards or a longer sequence.")
  forward = [(i, i + 1) for i in range(shards - 1)]
  return [jax.lax.ppermute(a[:, -count:], axis_name, forward) for a in arrays]


def previous_inputs(x: jax.Array, reset: jax.Array | None, count: int,
                    axis_name: Hashable) -> jax.Array:
  """The last `count` rows of the previous shard's x [B, T, D] (zeros on the first shard), with
  the rows before that shard's last reset among them zeroed: the history a short causal
  convolution needs at a shard boundary (a zero row adds nothing to the convolution, so an
  earlier document's inputs never reach this shard's first tokens).

  Raises:
    ValueError: `count` is more than the shard's length.
  """
  shards = check_axis_name(axis_name)
  time = x.shape[1]
  if count > time:
    raise ValueError(f"the short convolution needs the last {count} inputs of the previous "
                     f"shard, but a shard holds {time} tokens (T sharded over {shards} shards).")
  rows = x[:, time - count:]
  if reset is not None:
    tail = reset[:, time - count:]
    # Row j is from an earlier document than the shard's end if a reset follows it in the tail.
    later_reset = jnp.flip(jnp.cumsum(jnp.flip(tail, axis=1), axis=1), axis=1) - tail
    rows = jnp.where((later_reset > 0)[..., None], 0, rows)
  return jax.lax.ppermute(rows, axis_name, [(i, i + 1) for i in range(shards - 1)])
