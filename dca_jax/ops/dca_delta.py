"""DCA with a delta-rule memory: the window's exact softmax plus a gated read-out of a memory that
overwrites associations (memory="delta").

The delayed stream is DCA's (the token at t - W enters the memory at step t, with the decay of
step t), but the memory is updated by the gated delta rule (`delta_rule.py`) on L2-normalised
keys instead of the additive rule on positive features:

    S_t = a_t (I - beta'_t k'_t k'_t^T) S_{t-1} + beta'_t k'_t v'_t^T,
    k'_t = k^_{t-W},  v'_t = v_{t-W},  beta'_t = beta_{t-W}   (zeros for t <= W or another document)
    o_t  = N_t / Z_t + sigmoid(g_t) S_t^T q^_t

with k^ = k / |k|, q^ = q / |q| (`l2_normalize`), beta_j = sigmoid(x_j W_b) the writing strength of
token j (kept in the window buffer until it leaves), and g_t a per-head gate of the input. The
additive memory's read-out is a positive kernel sum and can share the window's softmax
normaliser; S^T q^ is not (it can be negative), so it is added through a gate instead. A unit
query reads back a stored value at its own scale (beta = 1, a matching key: S^T k^ = v).

When T <= W the delayed stream is empty, S stays 0 and o_t is exactly causal softmax attention,
as with the additive memory. Notation: B batch, T time, H heads, K key dim, V value dim, W window.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks
from dca_jax.ops.dca_memory import (after_lead, before_lead, empty_lead, shard_entry,
                                    softmax_over_window, state_after, step_reads,
                                    window_and_stream, write_step)
from dca_jax.ops.dca_params import DCAWeights
from dca_jax.ops.delta_rule import entering_state, l2_normalize, run_delta_rule
from dca_jax.ops.planner import Mode, PlanKind, adaptive_scale
from dca_jax.ops.rotary import rotary_phase, rotate_pairs
from dca_jax.ops.rowwise import scale_rows
from dca_jax.ops.segments import document_ids
from dca_jax.ops.window import window_step_parts


class DCADeltaState(NamedTuple):
  """Constant-size state of DCA with the delta memory after a prefix of the sequence.

  Attributes:
    keys: [B, H, W + 1, K] float32, the last W + 1 keys (not normalised), rotated at their
      positions, in the ring slots of `DCAState` (the token at position p in slot p mod (W + 1)).
    values: [B, H, W + 1, V] float32, their values.
    betas: [B, H, W + 1] float32, their writing strengths (used when they leave the window).
    doc_start: [B] int32, absolute position of each row's current document (as `DCAState`).
    memory: [B, H, K, V] float32, the delta rule's state S.
    position: int32 scalar, the number of tokens seen.
  """

  keys: jax.Array
  values: jax.Array
  betas: jax.Array
  doc_start: jax.Array
  memory: jax.Array
  position: jax.Array

  @property
  def window(self) -> int:
    return self.keys.shape[2] - 1


def init_delta_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int,
                     window: int) -> DCADeltaState:
  """An empty `DCADeltaState` (no token seen): zero memory, every window slot empty."""
  for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("key_dim", key_dim),
                      ("value_dim", value_dim), ("window", window)):
    _checks.check_positive_int(name, value)
  f32 = jnp.float32
  return DCADeltaState(
      keys=jnp.zeros((batch_size, num_heads, window + 1, key_dim), f32),
      values=jnp.zeros((batch_size, num_heads, window + 1, value_dim), f32),
      betas=jnp.zeros((batch_size, num_heads, window + 1), f32),
      doc_start=jnp.zeros((batch_size,), jnp.int32),
      memory=jnp.zeros((batch_size, num_heads, key_dim, value_dim), f32),
      position=jnp.zeros((), jnp.int32))


def check_delta_weights(weights: DCAWeights, step: bool) -> None:
  """Checks `DCAWeights` of the delta memory: q, k [.., H, K], v [.., H, V], and log_decay, gate
  and beta [.., H] with the same leading dims ([B, T] or, for one step, [B])."""
  rank = 3 if step else 4
  for name in ("q", "k", "v"):
    _checks.check_array(f"weights.{name}", getattr(weights, name), rank)
  lead = weights.q.shape[:-1]
  for name in ("k", "v"):
    if getattr(weights, name).shape[:-1] != lead:
      raise ValueError(f"weights.{name} has leading shape {getattr(weights, name).shape[:-1]}, "
                       f"expected {lead} (from weights.q).")
  if weights.k.shape[-1] != weights.q.shape[-1]:
    raise ValueError(f"weights.k has key dim {weights.k.shape[-1]}, expected {weights.q.shape[-1]}.")
  for name in ("log_decay", "gate", "beta"):
    x = getattr(weights, name)
    if x is None:
      raise ValueError(f"weights.{name} must be given with the delta memory (from "
                       f"compute_weights of memory='delta' parameters), got None.")
    _checks.check_array(f"weights.{name}", x, rank - 1)
    if x.shape != lead:
      raise ValueError(f"weights.{name} has shape {x.shape}, expected {lead} (one per head).")


def _check_state(state: DCADeltaState, batch: int, weights: DCAWeights) -> None:
  if not isinstance(state, DCADeltaState):
    raise TypeError(f"state must be a DCADeltaState (the delta memory's), got "
                    f"{type(state).__name__}.")
  heads, key_dim = weights.q.shape[-2:]
  value_dim, window = weights.v.shape[-1], state.window
  slots = window + 1
  expected = {"keys": (batch, heads, slots, key_dim), "values": (batch, heads, slots, value_dim),
              "betas": (batch, heads, slots), "doc_start": (batch,),
              "memory": (batch, heads, key_dim, value_dim)}
  for name, shape in expected.items():
    got = tuple(getattr(state, name).shape)
    if got != shape:
      raise ValueError(f"state.{name} has shape {got}, expected {shape} (from the weights' B, H, "
                       f"K, V).")


def _read_out(num, den, memory_out, gate, *, top=None, live=None):
  """o = N / Z + sigmoid(g) S^T q^ (the window's softmax plus the gated memory read-out).

  Both per-row factors through `rowwise.scale_rows`: the gradients of Z and g are then einsums,
  not reduce-of-multiply ops, which XLA:CPU runs in YNNPACK's slow reduction (`rowwise`).
  `top` (the window's max logit m, N and Z being relative to it) and `live` (bool: whether the
  memory has received a token of the current document) are not used by this read-out; they are
  passed for the alternatives `experiments/readout_study.py` measures against it."""
  del top, live
  return scale_rows(num, 1.0 / den) + scale_rows(memory_out, jax.nn.sigmoid(gate))


def attention_compress_delta(weights: DCAWeights, *, window: int, reset=None, state=None,
                             mode: Mode | str = "auto", chunk_size: int | None = None,
                             rotary_base: float | None = 10000.0, return_state: bool = False,
                             axis_name=None, confine_nonfinite: bool = True):
  """DCA with the delta memory over a whole sequence (the module equations, t = 1..T).

  `attention_compress` calls this for weights of the delta memory (`weights.beta` given); the
  arguments and the result are the same, with a `DCADeltaState` as the state. The one plan of
  the call is `adaptive_scale(..., delta_memory=True)`'s: whether the memory runs at all (not
  when T <= W without a state: exact softmax) and, with `mode` and `chunk_size`, the delta
  rule's form (`planner.delta_rule_plans`: "auto" is the recurrent form when evaluated on CPU,
  the chunked one when differentiated past a chunk), handed to `run_delta_rule` as made.

  With `axis_name` (T sharded over that mesh axis inside `jax.shard_map`, as in
  `attention_compress`) the previous shard's last W keys, values and betas arrive by one
  `ppermute` (`dca_memory.shard_entry`) and the memory's entering state is the delta rule's
  (`delta_rule_attention(..., axis_name=)`: every shard's affine summary, one `all_gather`);
  one plan serves evaluation and gradient there, and `return_state` returns the state after the
  whole sequence on every shard.

  Returns:
    o [B, T, H, V] in v's dtype, or (o, `DCADeltaState`) when `return_state`.

  Raises:
    ValueError / TypeError: malformed weights, window < 1, reset or state of the wrong shape.
  """
  check_delta_weights(weights, step=False)
  batch, time, heads, key_dim = weights.q.shape
  _checks.check_reset(reset, batch, time)
  if state is not None:
    _check_state(state, batch, weights)
    if state.window != window:
      raise ValueError(f"state has a window of {state.window} (state.keys of shape "
                       f"{tuple(state.keys.shape)}: [B, H, W + 1, K], a ring of W + 1 slots), "
                       f"expected window = {window}.")
  # The softmax shortcut is exact here whatever the gate: an empty memory adds exactly 0.
  # Sharded: the memory always runs (a shard's window reaches into the previous one), with one
  # plan for evaluation and gradient (see `attention_compress`).
  plan = adaptive_scale(time, window=window,
                        has_state=state is not None or return_state or axis_name is not None,
                        delta_memory=True, mode=mode, chunk_size=chunk_size,
                        needs_grad=axis_name is not None)
  if axis_name is not None:
    plan = dataclasses.replace(plan, engine_grad=plan.engine)
  return _compiled_compress_delta(weights, reset, state, plan=plan, window=window,
                                  rotary_base=rotary_base, return_state=return_state,
                                  axis_name=axis_name,
                                  guard=_checks.check_flag("confine_nonfinite", confine_nonfinite))


@functools.partial(jax.jit, static_argnames=("plan", "window", "rotary_base", "return_state",
                                             "axis_name", "guard"))
def _compiled_compress_delta(weights: DCAWeights, reset, state, *, plan, window: int, rotary_base,
                             return_state: bool, axis_name=None, guard: bool = True):
  """`attention_compress_delta` on checked inputs with its plan made, one compiled program (see
  `dca._compiled_compress`)."""
  batch, time, heads, key_dim = weights.q.shape
  out_dtype = weights.v.dtype
  scale = 1.0 / math.sqrt(key_dim)
  f32 = jnp.float32
  doc = jnp.zeros((batch, time), jnp.int32) if reset is None else document_ids(reset)

  if plan.kind is PlanKind.SOFTMAX:
    return softmax_over_window(weights, doc, window=window, rotary_base=rotary_base,
                               guard=guard)

  new = (weights.k, weights.v, weights.beta)
  buffered = None
  if axis_name is not None:
    # Only position and doc_start of this state are read; the buffers are the halo.
    incoming = state
    start, doc_start, buffered = shard_entry(new, reset, window, axis_name, incoming,
                                             rotary_base)
    state = DCADeltaState(keys=None, values=None, betas=None, doc_start=doc_start,
                          memory=None if incoming is None else incoming.memory, position=start)
  (num, den, top), (k_in, v_in, beta_in), same_doc, tails = window_and_stream(
      weights.q, new, doc, reset, state, window=window, scale=scale, rotary_base=rotary_base,
      buffered=buffered, guard=guard)

  # Step t writes the token at t - W if it belongs to t's document (else nothing: k = 0, beta = 0).
  same_doc = same_doc[:, :, None]                                                    # [B, T, 1]
  keys_in = jnp.where(same_doc[..., None], l2_normalize(k_in), 0.0)
  values_in = jnp.where(same_doc[..., None], v_in, 0.0)
  betas_in = jnp.where(same_doc, beta_in, 0.0)
  plans = (plan.engine, plan.engine_grad)
  q_unit = l2_normalize(weights.q.astype(f32))
  if axis_name is not None:
    # The memory's state entering this shard: every shard's affine summary, one all_gather.
    initial = entering_state(plans, q_unit, keys_in, values_in, betas_in, weights.log_decay,
                             state.memory, reset, axis_name)
  else:
    initial = None if state is None else state.memory
  skip = empty_lead(window, time, state=state, axis_name=axis_name, guard=guard)
  *engine_in, engine_reset = after_lead(skip, q_unit, keys_in, values_in, betas_in,
                                        weights.log_decay, reset)
  memory_out, memory = run_delta_rule(plans, *engine_in, initial_state=initial,
                                      reset=engine_reset, guard=guard)
  memory_out = before_lead(skip, memory_out)
  o = _read_out(num, den, memory_out, weights.gate.astype(f32), top=top,
                live=same_doc[..., 0]).astype(out_dtype)
  if not return_state:
    return o
  (keys, values, betas), doc_start, end, memory = state_after(
      tails, state, reset, memory, time=time, rotary_base=rotary_base, axis_name=axis_name)
  return o, DCADeltaState(keys=keys, values=values, betas=betas, doc_start=doc_start,
                          memory=memory, position=end)


def delta_memory_state_update(state: DCADeltaState, weights: DCAWeights, *,
                              rotary_base: float | None = 10000.0, reset=None):
  """One decoding step of DCA with the delta memory: O(W (K + V) + K V) work, independent of t.

  The oldest buffered token leaves the window and is written into S by one delta rule step
  (S <- a_t (S - beta k^ (S^T k^)^T) + beta k^ v^T, the recurrent form's update), the new token
  enters the window and the output adds the gated read-out S^T q^ to the window's softmax.
  `memory_state_update` calls this for a `DCADeltaState`; step by step it equals
  `attention_compress_delta`.

  Returns:
    (o [B, H, V] in v's dtype, new `DCADeltaState`).
  """
  check_delta_weights(weights, step=True)
  batch = weights.q.shape[0]
  _check_state(state, batch, weights)
  _checks.check_step_reset(reset, batch)
  return _compiled_delta_step(state, weights, reset, rotary_base=rotary_base)


@functools.partial(jax.jit, static_argnames=("rotary_base",))
def _compiled_delta_step(state: DCADeltaState, weights: DCAWeights, reset, *, rotary_base):
  """`delta_memory_state_update` on checked inputs, one compiled program (see `dca_decode`)."""
  f32 = jnp.float32
  window, t = state.window, state.position
  step = write_step(state, weights, weights.beta, rotary_base, reset)
  (keys, vals, betas), seen, new, write_due = step_reads(step, t, window, weights.q.shape[0])

  # The token at t - W, in slot (t + 1) mod (W + 1) (not written by this step), leaves the
  # window and is written into S by one delta rule step; its key is rotated back from its
  # position t - W first.
  out = (t + 1) % (window + 1)
  leaving = ((t - window >= 0) & (t - window >= step.doc_start))[:, None]            # [B, 1]
  k_out = jax.lax.dynamic_index_in_dim(keys, out, 2, False)                          # [B, H, K]
  if rotary_base is not None:
    cos, sin = rotary_phase(window - t, k_out.shape[-1], rotary_base)
    k_out = rotate_pairs(k_out, cos, sin)
  k_out = jnp.where(leaving[..., None], l2_normalize(k_out), 0.0)
  v_out = jnp.where(leaving[..., None], jax.lax.dynamic_index_in_dim(vals, out, 2, False), 0.0)
  beta = jnp.where(leaving, jax.lax.dynamic_index_in_dim(betas, out, 2, False), 0.0)
  beta = beta[..., None, None]                                                       # [B, H, 1, 1]
  decay = jnp.exp(weights.log_decay.astype(f32))[..., None, None]
  memory = step.memory
  read = jnp.einsum("bhk,bhkv->bhv", k_out, memory)
  memory = decay * (memory - beta * k_out[..., :, None] * read[..., None, :])
  memory = memory + beta * k_out[..., :, None] * v_out[..., None, :]

  num, den, top = window_step_parts(step.q, keys, vals, seen, new=new)
  memory_out = jnp.einsum("bhk,bhkv->bhv", l2_normalize(weights.q.astype(f32)), memory)
  o = _read_out(num, den, memory_out, weights.gate.astype(f32), top=top,
                live=leaving[:, 0]).astype(weights.v.dtype)
  if write_due:
    keys, vals, betas = step.write(o)   # after every read: o needs them all
  return o, DCADeltaState(keys=keys, values=vals, betas=betas, doc_start=step.doc_start,
                          memory=memory, position=t + 1)
