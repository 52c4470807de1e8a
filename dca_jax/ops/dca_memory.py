"""DCA's memories: the constant-size state and the rule that reads both under one normaliser.

`DCAState` is what DCA keeps after a prefix of the sequence (the last W tokens exactly, the
compressed memory of everything older); `combine_memories` is the output rule shared by the
whole-sequence form (`attention_compress`) and the decode step (`memory_state_update`).
Notation: B batch, W window, H heads, K key dim, V value dim, F features.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks, sequence_parallel
from dca_jax.ops.dca_params import DCAWeights
from dca_jax.ops.rotary import rotary_phase, rotate_pairs
from dca_jax.ops.rowwise import scale_rows
from dca_jax.ops.window import window_softmax_parts


class DCAState(NamedTuple):
  """Constant-size state of DCA after a prefix of the sequence.

  The window is a ring buffer of W + 1 slots, heads first: the token at absolute position p
  lives in slot p mod (W + 1), so a decoding step writes one slot and moves nothing. The extra
  slot holds the token that has just left the window, so that a step reads it (to fold it into
  the memory) after writing the new token into another slot: the buffers are then updated in
  place. With t = `position`, slot s holds the token at t - (W + 1) + ((s - t) mod (W + 1)); the
  query at t - 1 attends to the W slots of positions t - W .. t - 1 (the slot t mod (W + 1) is
  the one that left), never to a negative position or one before `doc_start`.

  Keys are stored rotated by their absolute positions (`rotary.rotary_phase`, exact modulo one
  turn) when the rotary base is not None, so a step rotates its query once instead of every
  buffered key; `window_buffers` returns them unrotated, oldest first.

  Attributes:
    keys: [B, H, W + 1, K] float32, the last W + 1 keys, rotated at their positions.
    values: [B, H, W + 1, V] float32, their values.
    key_features: [B, H, W + 1, F] float32, their features (folded into memory on eviction).
    doc_start: [B] int32, absolute position of the first token of each row's current document
      (0 until a reset).
    memory: [B, H, F, V + 1] float32 compressed memory; the last column is the normaliser z.
    position: int32 scalar, the number of tokens seen (the absolute position of the next one).
  """

  keys: jax.Array
  values: jax.Array
  key_features: jax.Array
  doc_start: jax.Array
  memory: jax.Array
  position: jax.Array

  @property
  def window(self) -> int:
    return self.keys.shape[2] - 1


def init_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, feature_dim: int,
               window: int) -> DCAState:
  """An empty `DCAState` (no token seen): zero memory, every window slot empty."""
  for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("key_dim", key_dim),
                      ("value_dim", value_dim), ("feature_dim", feature_dim), ("window", window)):
    _checks.check_positive_int(name, value)
  f32 = jnp.float32
  return DCAState(
      keys=jnp.zeros((batch_size, num_heads, window + 1, key_dim), f32),
      values=jnp.zeros((batch_size, num_heads, window + 1, value_dim), f32),
      key_features=jnp.zeros((batch_size, num_heads, window + 1, feature_dim), f32),
      doc_start=jnp.zeros((batch_size,), jnp.int32),
      memory=jnp.zeros((batch_size, num_heads, feature_dim, value_dim + 1), f32),
      position=jnp.zeros((), jnp.int32),
  )


def check_state(state: DCAState, batch: int, weights: DCAWeights) -> None:
  heads, key_dim = weights.q.shape[-2:]
  value_dim, feature_dim = weights.v.shape[-1], weights.q_features.shape[-1]
  window = state.window
  expected = {
      "keys": (batch, heads, window + 1, key_dim),
      "values": (batch, heads, window + 1, value_dim),
      "key_features": (batch, heads, window + 1, feature_dim),
      "doc_start": (batch,),
      "memory": (batch, heads, feature_dim, value_dim + 1),
  }
  for name, shape in expected.items():
    got = tuple(getattr(state, name).shape)
    if got != shape:
      raise ValueError(f"state.{name} has shape {got}, expected {shape} (from the weights' B, H, K, V, F).")
  if tuple(state.position.shape) != ():
    raise ValueError(f"state.position has shape {tuple(state.position.shape)}, expected () (one "
                     "position for the whole batch).")


def slot_positions(position: jax.Array, window: int) -> jax.Array:
  """[W + 1] int32: the absolute position of the token each ring slot holds after `position`
  tokens (negative: nothing written yet). Slot s holds position - (W + 1) + ((s - position) mod
  (W + 1))."""
  slots = jnp.arange(window + 1, dtype=jnp.int32)
  return position - (window + 1) + (slots - position) % (window + 1)


def ring_to_ordered(x: jax.Array, position: jax.Array) -> jax.Array:
  """A ring buffer [B, H, W + 1, ...] after `position` tokens -> its last W tokens, oldest first,
  time before heads: [B, W, H, ...]."""
  slots = x.shape[2]
  x = jnp.roll(x, -((position - (slots - 1)) % slots), axis=2)[:, :, :slots - 1]
  return jnp.moveaxis(x, 2, 1)


def ordered_to_ring(x: jax.Array, position: jax.Array) -> jax.Array:
  """The last W tokens [B, W, H, ...], oldest first, after `position` tokens -> the ring buffer
  [B, H, W + 1, ...] (the slot of the token before them, position mod (W + 1), is zero)."""
  window = x.shape[1]
  x = jnp.moveaxis(x, 1, 2)
  x = jnp.concatenate([x, jnp.zeros_like(x[:, :, :1])], axis=2)
  return jnp.roll(x, (position - window) % (window + 1), axis=2)


def rotate_window(keys: jax.Array, first: jax.Array, rotary_base: float | None,
                  sign: int = 1) -> jax.Array:
  """Keys [B, W, H, K], oldest first, of the positions first .. first + W - 1, rotated by +/- their
  positions (`rotary.rotary_phase`); unchanged (float32) without rotary positions."""
  keys = keys.astype(jnp.float32)
  if rotary_base is None:
    return keys
  positions = sign * (first + jnp.arange(keys.shape[1], dtype=jnp.int32))
  cos, sin = rotary_phase(positions, keys.shape[-1], rotary_base)                 # [W, K/2]
  return rotate_pairs(keys, cos[None, :, None], sin[None, :, None])


def window_buffers(state, rotary_base: float | None) -> list[jax.Array]:
  """The buffered tokens of a decoding state, oldest first, time before heads: the W keys
  (unrotated) [B, W, H, K] and the state's other buffers [B, W, H, ...] (values, then the key
  features of a `DCAState` or the betas of a `DCADeltaState`)."""
  position, window = state.position, state.window
  keys = rotate_window(ring_to_ordered(state.keys, position), position - window, rotary_base,
                       sign=-1)
  return [keys] + [ring_to_ordered(b, position) for b in state[1:3]]


def ring_buffers(ordered, end: jax.Array, rotary_base: float | None) -> list[jax.Array]:
  """The inverse of `window_buffers`: the last W tokens' keys and other buffers [B, W, H, ...],
  oldest first, after `end` tokens -> the state's ring buffers (keys rotated)."""
  keys, *rest = ordered
  window = keys.shape[1]
  keys = rotate_window(keys, end - window, rotary_base)
  return [ordered_to_ring(b, end) for b in [keys] + list(rest)]


def buffer_doc(position: jax.Array, doc_start: jax.Array, window: int) -> jax.Array:
  """[B, W] int32 document ids of a state's buffered tokens, oldest first: 0 for a token of the
  row's current document and -1 for an empty slot or one of an earlier document (never
  attended, never folded into a memory), as the whole-sequence forms count them (the new
  tokens' first document is 0)."""
  held = position - window + jnp.arange(window, dtype=jnp.int32)
  current = (held[None, :] >= 0) & (held[None, :] >= doc_start[:, None])
  return jnp.where(current, 0, -1).astype(jnp.int32)


def softmax_over_window(weights: DCAWeights, doc: jax.Array, *, window: int, rotary_base,
                        guard: bool = True):
  """The whole-sequence forms' shortcut with no memory to read (T <= W and no state): exact
  causal softmax over the window, [B, T, H, V] in v's dtype (`guard` as
  `window_softmax_parts`)."""
  num, den, _ = window_softmax_parts(weights.q, weights.k, weights.v, window=window,
                                     scale=1.0 / math.sqrt(weights.q.shape[-1]), doc=doc,
                                     rotary_base=rotary_base, guard=guard)
  return scale_rows(num, 1.0 / den).astype(weights.v.dtype)   # the gradient of 1 / Z: an einsum


def extend_with_buffer(position: jax.Array, doc_start: jax.Array, old, new, doc: jax.Array):
  """The sequence extended on the left by a state's W buffered tokens, oldest first.

  The window of the first new queries reaches into the buffer, and the buffer's tokens are the
  first to leave the window. They count as document 0 (the new tokens' first) when they are in
  the row's current document, else as -1 (never attended, never folded into a memory).

  Args:
    position: the state's position (the absolute position of the first new token).
    doc_start: [B] the state's document starts.
    old: the buffered tokens [B, W, H, ...], oldest first (`window_buffers`).
    new: the new tokens' arrays [B, T, H, ...], one per buffer (cast to float32).
    doc: [B, T] int32 document ids of the new tokens (`segments.document_ids`).

  Returns:
    ([B, W + T, ...] float32 per buffer, doc [B, W + T] int32).
  """
  window = old[0].shape[1]
  extended = [jnp.concatenate([o.astype(jnp.float32), n.astype(jnp.float32)], axis=1)
              for o, n in zip(old, new)]
  return extended, jnp.concatenate([buffer_doc(position, doc_start, window), doc], axis=1)


def window_after_buffer(q, ext_k, ext_v, ext_doc, *, window: int, scale, rotary_base,
                        guard: bool = True):
  """The window's softmax parts (N, Z, m) of the new queries q [B, T, H, K] over the extended
  keys and values (`extend_with_buffer`): each [B, T, ...] (`guard` as `window_softmax_parts`)."""
  ext_q = jnp.concatenate([jnp.zeros(q.shape[:1] + (window,) + q.shape[2:], jnp.float32),
                           q.astype(jnp.float32)], axis=1)
  num, den, top = window_softmax_parts(ext_q, ext_k, ext_v, window=window, scale=scale,
                                       doc=ext_doc, rotary_base=rotary_base, guard=guard)
  return num[:, window:], den[:, window:], top[:, window:]


def window_and_stream(q, new, doc: jax.Array, reset, state, *, window: int, scale, rotary_base,
                      buffered=None, guard: bool = True):
  """The window's parts for the new queries and the stream the memory reads, for both memories.

  Step t folds in the token at t - W (the one leaving the window) if it belongs to t's document.
  With a state, its W buffered tokens come first (`extend_with_buffer`). Without one (the empty
  state: training, evaluation, a first prefill) the window runs over the new tokens alone, with
  no document masks when there are no resets, and the stream is the new tokens shifted by W:
  one window block fewer than W empty slots in front, and the same result (tested).

  Args:
    q: [B, T, H, K] new queries.
    new: the new tokens' (k, v, third) [B, T, H, ...] (third: key features or betas).
    doc: [B, T] int32 document ids (`segments.document_ids`; zeros without resets).
    reset: the call's reset or None.
    state: a `DCAState` / `DCADeltaState`, or None.
    window, scale, rotary_base, guard: as `window_softmax_parts`.
    buffered: the W tokens before the new ones, in place of the state's buffers (a shard's halo
      under sequence parallelism, `shard_entry`); the state gives position and doc_start.

  Returns:
    ((N, Z, m) of the window, the stream [B, T, ...] float32 per array of `new` (the token at
    t - W, zero before the first; not masked), same_doc bool [B, T] (whether step t folds it in),
    the last W tokens [B, W, ...] float32 per array, oldest first (zeros before the first), for
    `ring_buffers`).
  """
  time = q.shape[1]
  f32 = jnp.float32
  if state is None:
    parts = window_softmax_parts(q, *new[:2], window=window, scale=scale,
                                 doc=None if reset is None else doc, rotary_base=rotary_base,
                                 guard=guard)

    def padded(x):   # W zeros in front
      return jnp.pad(x.astype(f32), ((0, 0), (window, 0)) + ((0, 0),) * (x.ndim - 2))

    extended = [padded(x) for x in new]
    doc_before = jnp.pad(doc, ((0, 0), (window, 0)), constant_values=-1)[:, :time]
  else:
    if buffered is None:
      buffered = window_buffers(state, rotary_base)
    extended, ext_doc = extend_with_buffer(state.position, state.doc_start, buffered, new, doc)
    parts = window_after_buffer(q, extended[0], extended[1], ext_doc, window=window,
                                scale=scale, rotary_base=rotary_base, guard=guard)
    doc_before = ext_doc[:, :time]
  return (parts, [x[:, :time] for x in extended], doc_before == doc,
          [x[:, -window:] for x in extended])


def empty_lead(window: int, time: int, *, state, axis_name, guard: bool) -> int:
  """How many leading steps of a call's memory stream (`window_and_stream`) the engine may skip.

  Without a state (training, evaluation, a first prefill) the memory starts empty and its first
  W steps insert nothing (the token leaving the window at step t is t - W), so it is still zero
  after them and the first W queries read zero from it: the engine can run on the other T - W
  steps (`after_lead`), its output padded back with zeros (`before_lead`). The same function,
  one chunk fewer of the engine's N when W equals the chunk length (a quarter at T = 256). Only
  on one device and where non-finite inputs need not be confined (`guard` False): a NaN decay
  among the first W steps would otherwise have to poison the later outputs it reaches.
  """
  return window if state is None and axis_name is None and not guard and time > window else 0


def after_lead(skip: int, *xs):
  """Each x [B, T, ...] (or None) without its first `skip` steps (`empty_lead`)."""
  return [x if x is None or not skip else x[:, skip:] for x in xs]


def before_lead(skip: int, out: jax.Array) -> jax.Array:
  """The engine's output [B, T - skip, ...] with `skip` zero steps in front (`empty_lead`)."""
  return out if not skip else jnp.pad(out, ((0, 0), (skip, 0)) + ((0, 0),) * (out.ndim - 2))


def shard_entry(new, reset, window: int, axis_name, state=None, rotary_base=None):
  """(position, doc_start, buffered) entering this shard when T is sharded over `axis_name`.

  For both memories' `window_and_stream` under sequence parallelism: `buffered` is the previous
  shard's last W tokens of each of `new` ([B, T, ...]: keys, values and the third buffer), oldest
  first (one `ppermute` each); the first shard gets the incoming `state`'s buffered tokens
  (`window_buffers`), or zeros without one, which count as empty slots. `position` is the
  absolute position of the shard's first token and `doc_start` [B] the start of each row's
  current document, from an `all_gather` of every shard's last reset (and the state's).

  Raises:
    ValueError: W longer than the shard (`sequence_parallel.previous_tail`).
  """
  batch, time = new[0].shape[:2]
  shards = sequence_parallel.check_axis_name(axis_name)
  index = jax.lax.axis_index(axis_name).astype(jnp.int32)
  offset = jnp.zeros((), jnp.int32) if state is None else state.position
  start = offset + index * time
  halo = [h.astype(jnp.float32) for h in sequence_parallel.previous_tail(new, window, axis_name)]
  incoming = jnp.zeros((batch,), jnp.int32)
  if state is not None:
    halo = [jnp.where(index == 0, b, h) for b, h in zip(window_buffers(state, rotary_base), halo)]
    incoming = state.doc_start
  if reset is None:
    last = jnp.full((batch,), -1, jnp.int32)
  else:
    last = jnp.max(jnp.where(reset, start + jnp.arange(time, dtype=jnp.int32), -1), axis=1)
  lasts = jax.lax.all_gather(last, axis_name)                                    # [N, B]
  earlier = (jnp.arange(shards) < index)[:, None]
  doc_start = jnp.maximum(jnp.max(jnp.where(earlier, lasts, -1), axis=0), incoming)
  return start, doc_start.astype(jnp.int32), halo


def from_last_shard(values, axis_name):
  """Each of `values` as the last shard along `axis_name` holds it, on every shard (a psum of it
  from that shard alone: an invariant value, as shard_map's out_specs=P() requires): the end
  state of a sequence sharded over `axis_name` is the last shard's."""
  last = jax.lax.axis_size(axis_name) - 1
  mine = jax.lax.axis_index(axis_name) == last
  return [jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), axis_name) for x in values]


def state_after(tails, state, reset, memory, *, time: int, rotary_base, axis_name=None):
  """The parts of the state after a whole-sequence call, for both memories: (ring buffers of the
  last W tokens `tails` from `window_and_stream`, doc_start [B], position, memory). `state` is
  the one the call continued (None: the empty state; a shard's entry under `axis_name`, whose
  sequence ends on the last shard: those parts come from there, `from_last_shard`)."""
  batch = tails[0].shape[0]
  start = jnp.zeros((), jnp.int32) if state is None else state.position
  doc_start = jnp.zeros((batch,), jnp.int32) if state is None else state.doc_start
  doc_start, end = doc_start_after(doc_start, reset, start), start + time
  if axis_name is not None:
    *tails, doc_start, memory, end = from_last_shard([*tails, doc_start, memory, end], axis_name)
  # Tokens of an earlier document are never read again, but a decoding step multiplies their
  # values by a weight of 0: they are zeroed, so that a non-finite one cannot leak (0 x NaN).
  current = buffer_doc(end, doc_start, tails[0].shape[1]) == 0                      # [B, W]
  tails = [jnp.where(current.reshape(current.shape + (1,) * (x.ndim - 2)), x, 0.0)
           for x in tails]
  return ring_buffers(tails, end, rotary_base), doc_start, end, memory


def doc_start_after(doc_start: jax.Array, reset: jax.Array | None, start: jax.Array) -> jax.Array:
  """doc_start [B] after the tokens at start .. start + T - 1 with `reset` [B, T] (or None):
  the absolute position of each row's last reset, or the incoming doc_start without one."""
  if reset is None:
    return doc_start
  time = reset.shape[1]
  last = jnp.max(jnp.where(reset, jnp.arange(time, dtype=jnp.int32), -1), axis=1)
  return jnp.where(last >= 0, start + last, doc_start).astype(jnp.int32)


class StepWrite(NamedTuple):
  """What `write_step` returns: the token's rotated query, key and value, the buffers before the
  write (what the step reads), `write` (the new state's buffers), memory and doc_start."""

  q: jax.Array           # [B, H, K] float32, rotated at t
  k: jax.Array           # [B, H, K] float32, rotated at t
  v: jax.Array           # [B, H, V] float32
  old_keys: jax.Array    # [B, H, W + 1, K], the buffers before the write (values zeroed in a
  old_values: jax.Array  # reset row)
  old_third: jax.Array
  write: Any             # write(after=None) -> (keys, values, third) after the write
  memory: jax.Array      # zero in a reset row
  doc_start: jax.Array


def write_step(state, weights: DCAWeights, third: jax.Array, rotary_base: float | None,
               reset: jax.Array | None) -> StepWrite:
  """The first half of a decoding step, the same for both memories: a reset, then the new token
  to be written into slot t mod (W + 1) of every buffer (in place; nothing shifts).

  With a reset in a row, everything buffered belongs to an earlier document and the memory
  starts empty: both are selected away (not multiplied by 0, so a non-finite old state cannot
  leak), and the old values are zeroed because the read-out multiplies them by their weight 0.
  The new key and the query are rotated at t once (the buffered keys were rotated at theirs).

  Two orders, the same function (`read_before_write`): at batch 1 the step reads the buffers as
  they were before the write (`StepWrite.old_*`; the slot written held the token at t - W - 1,
  which no query at t sees), takes the new token from `k` and `v`, and then calls
  `write(o)` with its output, whose rows are selected on a condition that never holds (t < 0)
  against it, so that XLA orders the write after every read and updates the buffers in place. At
  larger batches it calls `write()` first and reads the written buffers. On XLA:CPU (jax 0.10.2)
  a read after the write at batch 1 had each write duplicated into two fusions on their own
  copies of the buffer, and a read before an unordered write copied every buffer at any batch
  (the optimised HLO of `generate`'s loop, `XLA_FLAGS=--xla_dump_to=DIR`, shows the copies).

  Args:
    state: a `DCAState` or `DCADeltaState`; its third buffer (key features or betas) receives
      `third`.
    weights: the token's `DCAWeights` ([B, H, .]).
    third: the token's entry of the third buffer.
    rotary_base, reset: as `memory_state_update`.

  Returns:
    a `StepWrite`.
  """
  f32 = jnp.float32
  t, window = state.position, state.window
  memory, doc_start, values = state.memory, state.doc_start, state.values
  if reset is not None:
    doc_start = jnp.where(reset, t, doc_start)
    memory = jnp.where(reset[:, None, None, None], 0.0, memory)
    values = jnp.where(reset[:, None, None, None], 0.0, values)
  q, k = weights.q.astype(f32), weights.k.astype(f32)
  if rotary_base is not None:
    cos, sin = rotary_phase(t, q.shape[-1], rotary_base)
    q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
  v = weights.v.astype(f32)
  slot = t % (window + 1)
  buffers = (state.keys, values, state[2])
  rows = (k, v, third.astype(f32))

  def write(after=None):
    written = rows if after is None else ordered_after(rows, after, t)
    return tuple(jax.lax.dynamic_update_index_in_dim(b, row, slot, 2)
                 for b, row in zip(buffers, written))

  return StepWrite(q=q, k=k, v=v, old_keys=buffers[0], old_values=buffers[1],
                   old_third=buffers[2], write=write, memory=memory, doc_start=doc_start)


def ordered_after(rows, after: jax.Array, position: jax.Array) -> tuple[jax.Array, ...]:
  """`rows` unchanged, but data-dependent on `after` (each selected against it on position < 0,
  which never holds), so that XLA writes them into a buffer only after `after` (what read the
  buffer) is computed: the in-place write of `read_before_write`."""
  after = jnp.sum(after.astype(jnp.float32))
  return tuple(jnp.where(position < 0, after, row) for row in rows)


def read_before_write(batch: int) -> bool:
  """Whether a decoding step at this batch size reads its ring buffers before writing the new
  token (`write_step`). Batch 1 only: on the 2-core Xeon the demo model's `generate` went from
  9,496 to 15,659 tokens/s at batch 1 after a 4,096-token prompt (docs/performance.json at
  commit 4360c81 and at 6fe7c7d, `python -m experiments.performance`). At batch 32, where a read
  after the write makes no copies, the write-first order stays (reading first measured slower
  there in the A/Bs of issue #11's notes)."""
  return batch == 1


def step_reads(step: StepWrite, position: jax.Array, window: int, batch: int):
  """What a decoding step reads, in the order `read_before_write` picks for the batch size.

  Returns:
    ((keys, values, third buffer), seen [B, W + 1] bool, the new token (k, v) apart or None,
    write_due): with write_due the buffers are the ones before the write, and the step calls
    `step.write(o)` with its output once every read is done; otherwise they are written already.
  """
  if read_before_write(batch):
    return ((step.old_keys, step.old_values, step.old_third),
            step_slots(position, step.doc_start, window, written=False), (step.k, step.v), True)
  return step.write(), step_slots(position, step.doc_start, window), None, False


def step_slots(position: jax.Array, doc_start: jax.Array, window: int, *,
               written: bool = True) -> jax.Array:
  """seen [B, W + 1] bool: the ring slots the query at `position` attends to, positions
  position - W + 1 .. position of the row's current document, in the buffers after this step's
  write (`written`) or before it (then its own token, not buffered yet, comes apart:
  `StepWrite.k` and `.v`)."""
  held = slot_positions(position + 1 if written else position, window)
  return (held[None, :] > position - window) & (held[None, :] >= doc_start[:, None])


def combine_memories(window_num, window_den, window_max, memory_out, value_dim, gate=None):
  """Both memories under one normaliser, with a stabiliser that keeps every term finite.

      o = (N e^{m_w} + M_num) / (Z e^{m_w} + M_den),   N, Z computed relative to m_w (window max)

  is evaluated relative to m = max(m_w, log M_den): every exponential is then <= 1 and one of
  the two weights is exactly 1, so the denominator is >= 1 (no NaN even when all window scores
  are far below zero and the memory is empty). o does not depend on m, hence no gradient.

  With a `gate` logit g (gated combination) the two are normalised separately instead:
  o = sigmoid(g) N / Z + (1 - sigmoid(g)) M_num / M_den (an empty memory contributes 0).
  """
  mem_num, mem_den = memory_out[..., :value_dim], memory_out[..., value_dim]
  # NaN (a memory that saw a non-finite input) counts as present, so it propagates.
  has_memory = ~(mem_den <= 0)
  safe_den = jnp.where(has_memory, mem_den, 1.0)
  if gate is not None:
    # Per-row factors through scale_rows: their gradients are einsums (rowwise).
    g = jax.nn.sigmoid(gate)
    # 1 / M_den stays finite: a subnormal normaliser (a memory decayed by ~e^-88) is read as the
    # smallest normal one rather than overflowing (CPUs flush it to zero anyway).
    inverse = 1.0 / jnp.maximum(safe_den, jnp.finfo(safe_den.dtype).tiny)
    mem_mean = jnp.where(has_memory[..., None], scale_rows(mem_num, inverse), 0.0)
    return scale_rows(window_num, g / window_den) + scale_rows(mem_mean, 1.0 - g)
  return _unified(window_num, window_den, jax.lax.stop_gradient(window_max), mem_num, mem_den)


def _unified_parts(window_num, window_den, window_max, mem_num, mem_den):
  has_memory = ~(mem_den <= 0)
  safe_den = jnp.where(has_memory, mem_den, 1.0)
  log_mem = jnp.where(has_memory, jnp.log(safe_den), -jnp.inf)
  top = jnp.maximum(window_max, log_mem)
  window_weight = jnp.exp(window_max - top)[..., None]
  memory_weight = jnp.exp(log_mem - top)[..., None]
  mem_mean = jnp.where(has_memory[..., None], mem_num / safe_den[..., None], 0.0)
  num = window_num * window_weight + memory_weight * mem_mean
  den = window_den[..., None] * window_weight + memory_weight
  # Per unit of memory normaliser: memory_weight / M_den = e^{-top} (0 without memory).
  per_unit = jnp.where(has_memory[..., None], memory_weight / safe_den[..., None], 0.0)
  return num / den, den, window_weight, per_unit


@jax.custom_vjp
def _unified(window_num, window_den, window_max, mem_num, mem_den):
  """The unified combination (see `combine_memories`), with a hand-written backward pass.

  With the stabiliser m held constant (the output does not depend on it), o = (N a + M_num b) /
  (Z a + M_den b) with a = e^{m_w - m} and b = e^{-m}: a linear-fractional map whose gradient is
  two scalings of g / den. Autodiff of the stabilised forward instead differentiates the log, the
  division and the selects separately (several passes over [B, T, H, V]).
  """
  return _unified_parts(window_num, window_den, window_max, mem_num, mem_den)[0]


def _unified_fwd(window_num, window_den, window_max, mem_num, mem_den):
  out, den, window_weight, per_unit = _unified_parts(window_num, window_den, window_max, mem_num,
                                                     mem_den)
  return out, (out, den, window_weight, per_unit)


def _unified_bwd(res, grad):
  out, den, window_weight, per_unit = res
  d_num = grad / den                                       # d o / d num
  # d o / d den (den is one per row), as an einsum: a reduce-of-multiply here went to XLA:CPU's
  # slow YNNPACK reduction (see dca_jax.ops.rowwise).
  d_den = -jnp.einsum("...v,...v->...", d_num, out, precision=jax.lax.Precision.HIGHEST)
  return (d_num * window_weight, d_den * window_weight[..., 0], None,
          d_num * per_unit, d_den * per_unit[..., 0])


_unified.defvjp(_unified_fwd, _unified_bwd)


