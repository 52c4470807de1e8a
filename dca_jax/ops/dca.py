"""Dynamic Compression Attention (DCA) as pure functions: the glossary of the library.

Per head, DCA keeps the last W tokens exactly (working memory, exact softmax) and folds every
token that leaves the window into a fixed-size matrix state (compressed memory) whose forgetting
rate is computed from the input (dynamic compression), with heads initialised at geometrically
spread half-lives (hierarchical compression). With s_tj = q_t . k_j / sqrt(K) (rotary positions,
relative offsets < W only) and phi a positive feature map of learned projections of q and k
(`feature_maps`; exp-like near 0, not an approximation of exp(s) everywhere):

    window:  N_t = sum_{j in (t-W, t]} e^{s_tj - m_t} v_j,   Z_t = sum_{j in (t-W, t]} e^{s_tj - m_t}
    memory:  M_t = a_t M_{t-1} + phi(k_{t-W}) [v_{t-W}, 1]^T        (a_t = exp(log_decay_t))
    output:  o_t = (N_t + e^{-m_t} phi(q_t)^T M_t[:, :V]) / (Z_t + e^{-m_t} phi(q_t)^T M_t[:, V])

where both terms are evaluated relative to m_t = max(max_j s_tj, log(phi(q_t)^T z_t)) (z the
memory's normaliser column), so every exponential is <= 1 and the denominator >= 1; the output
does not depend on m_t. The memory is the gated linear attention engine
run on the stream delayed by W tokens, so a token is counted either in the window or in the
memory, never in both. When T <= W the memory is empty and DCA is exactly causal softmax.

Functions (B batch, T time, H heads, K key dim, V value dim, F feature dim, W window):

* `compute_weights` (`dca_params.py`): input -> queries, keys, values, features, log decays.
* `attention_compress` (this file): a whole sequence (training, prefill), any engine form.
* `memory_state_update` (`dca_decode.py`): one decoding step on a constant-size `DCAState`
  (`dca_memory.py`, with the output rule both forms share).
* `adaptive_scale` (`planner.py`): the plan (exact softmax, compressed with a chunk size, or
  single step), computed once per call and passed down.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks, sequence_parallel
from dca_jax.ops.dca_delta import attention_compress_delta
from dca_jax.ops.dca_memory import (DCAState, after_lead, before_lead, check_state,
                                    combine_memories, empty_lead, shard_entry,
                                    softmax_over_window, state_after, window_and_stream)
from dca_jax.ops.dca_params import DCAWeights, check_weights
from dca_jax.ops.gla import run_engine
from dca_jax.ops.planner import Mode, PlanKind, adaptive_scale
from dca_jax.ops.segments import document_ids


def attention_compress(weights: DCAWeights, *, window: int, reset: jax.Array | None = None,
                       state: DCAState | None = None, mode: Mode | str = "auto",
                       chunk_size: int | None = None, rotary_base: float | None = 10000.0,
                       return_state: bool = False, axis_name=None,
                       confine_nonfinite: bool = True):
  """DCA over a whole sequence: exact softmax over the last W tokens + compressed memory of the rest.

  Implements the module-level equations for t = 1..T, continuing from `state` when given (so
  two calls chained through the returned state equal one call over the concatenation).

  Args:
    weights: `DCAWeights` from `compute_weights`, shapes [B, T, H, .]. Weights of the delta
      memory (`weights.beta` given, from memory="delta" parameters) run
      `dca_delta.attention_compress_delta`: the same call with a delta-rule memory.
    window: W >= 1, the number of most recent tokens seen exactly (the token itself included).
    reset: optional bool [B, T]; true where a new document starts (nothing crosses it: neither
      the window nor the memory).
    state: optional `DCAState` to continue from (its window must equal `window`); a
      `DCADeltaState` for weights of the delta memory.
    mode: engine form for the memory: "auto", "chunked", "recurrent", "associative",
      "quadratic" (see `gated_linear_attention`).
    chunk_size: engine chunk size (chunked form).
    rotary_base: rotary embedding base for the window scores (relative offsets < W only), or
      None for no positions in the window.
    return_state: also return the `DCAState` after the last token.
    axis_name: None (one device), or the mesh axis that T is sharded over inside
      `jax.shard_map` (weights and reset are this shard's contiguous slice): the previous
      shard's last W keys, values and key features (betas for the delta memory) arrive by one
      `ppermute` (the halo), the document start by an `all_gather` of each shard's last
      reset, and the memory's carried state as in `gated_linear_attention(..., axis_name=)`
      (`delta_rule_attention(..., axis_name=)` for the delta memory). Needs W <= the shard's
      length. A `state` (replicated) continues on the first shard (its buffered tokens are that
      shard's halo, its memory the state entering it). With `return_state` every shard returns
      the state after the whole sequence (the last shard's buffers and document start, the
      carried memory), replicated: a sharded prefill for decoding on one device.
    confine_nonfinite: a NaN or infinity in the weights makes NaN exactly the outputs that see
      its token (its query; its key, value or features through the window or the memory, within
      its document), and no other. False skips that work (4-9 % of a DCA layer's training step
      at T = 1024-8192 on the 2-core CPU, docs/confine_check.json, `python -m
      experiments.confine_check --layers dca --lengths 1024 8192`) for callers
      whose weights are finite by construction, such as `DCAttention`, which confines a
      non-finite input x itself; non-finite weights then give NaN outputs beyond the ones that
      see them, earlier tokens included (with one decay per head, the engine's chunk states of a
      pass of up to `chunked.MAX_CHUNK_MATRIX` chunks are one matmul, where 0 * NaN is NaN).
      Without a state, on one device (axis_name None) and for T > W, False also lets the
      memory's engine skip the first W steps, which insert nothing into the empty memory (T - W
      steps instead of T; the same function).

  Returns:
    o [B, T, H, V] in v's dtype, or (o, state) when `return_state`.

  Raises:
    ValueError / TypeError: malformed weights, window < 1, reset or state of the wrong shape,
      confine_nonfinite not a Python bool.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dca_jax import init_params, compute_weights
    >>> params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=8)
    >>> x = jax.random.normal(jax.random.key(1), (1, 20, 32))
    >>> o = attention_compress(compute_weights(params, x), window=8)
    >>> o.shape
    (1, 20, 2, 16)

  References:
    docs/theory.md (the mechanism); Arora et al. 2024 (Based: linear attention beside a sliding window);
    Munkhdalai et al. 2024 (Infini-attention: compressive memory beside local attention).
  """
  if axis_name is not None:
    sequence_parallel.check_axis_name(axis_name)
  guard = _checks.check_flag("confine_nonfinite", confine_nonfinite)
  if weights.beta is not None:     # the delta memory (memory="delta"), see `dca_delta`
    return attention_compress_delta(weights, window=window, reset=reset, state=state, mode=mode,
                                    chunk_size=chunk_size, rotary_base=rotary_base,
                                    return_state=return_state, axis_name=axis_name,
                                    confine_nonfinite=guard)
  check_weights(weights, step=False)
  batch, time, heads, key_dim = weights.q.shape
  _checks.check_reset(reset, batch, time)
  if state is not None:
    if not isinstance(state, DCAState):
      raise TypeError(f"state must be a DCAState or None, got {type(state).__name__}.")
    if state.window != window:
      raise ValueError(f"state has a window of {state.window} (state.keys of shape "
                       f"{tuple(state.keys.shape)}: [B, H, W + 1, K], a ring of W + 1 slots), "
                       f"expected window = {window}.")
    check_state(state, batch, weights)
  # The one plan of this call (it checks window, mode and chunk_size), used all the way down. The
  # softmax shortcut returns no state and has no gate, so asking for either needs the memory path.
  needs_memory = (state is not None or return_state or weights.gate is not None
                  or axis_name is not None)
  plan = adaptive_scale(time, window=window, has_state=needs_memory, mode=mode,
                        chunk_size=chunk_size,
                        per_channel_decay=weights.log_decay.ndim == weights.q.ndim,
                        # Sharded: one plan for both (the custom_jvp that pairs two plans loses
                        # shard_map's varying type of the state, jax 0.10.2).
                        needs_grad=axis_name is not None)
  if axis_name is not None:
    plan = dataclasses.replace(plan, engine_grad=plan.engine)
  return _compiled_compress(weights, reset, state, plan=plan, window=window,
                            rotary_base=rotary_base, return_state=return_state,
                            axis_name=axis_name, guard=guard)


@functools.partial(jax.jit, static_argnames=("plan", "window", "rotary_base", "return_state",
                                             "axis_name", "guard"))
def _compiled_compress(weights: DCAWeights, reset, state, *, plan, window: int, rotary_base,
                       return_state: bool, axis_name, guard: bool = True):
  """`attention_compress` on checked inputs with its plan made, as one compiled program (called
  eagerly, its ops would otherwise compile one by one: ~29 s for the README's first example on
  the 2-core CPU against ~4 s; inlined inside a caller's jit)."""
  batch, time, heads, key_dim = weights.q.shape
  value_dim = weights.v.shape[-1]
  out_dtype = weights.v.dtype
  scale = 1.0 / math.sqrt(key_dim)
  f32 = jnp.float32
  doc = jnp.zeros((batch, time), jnp.int32) if reset is None else document_ids(reset)

  if plan.kind is PlanKind.SOFTMAX:
    return softmax_over_window(weights, doc, window=window, rotary_base=rotary_base,
                               guard=guard)

  buffered = None
  if axis_name is not None:
    # Only position and doc_start of this state are read (the buffers are the halo); its memory
    # is zero: the carried state is added after the engine (`sequence_parallel.combine_shards`).
    incoming = state
    start, doc_start, buffered = shard_entry((weights.k, weights.v, weights.k_features), reset,
                                             window, axis_name, incoming, rotary_base)
    memory = sequence_parallel.varying(
        jnp.zeros((batch, heads, weights.q_features.shape[-1], value_dim + 1), f32), axis_name,
        like=weights.q)
    state = DCAState(keys=None, values=None, key_features=None, doc_start=doc_start,
                     memory=memory, position=start)
  (num, den, top), (k_in, v_in, kf_in), same_doc, tails = window_and_stream(
      weights.q, (weights.k, weights.v, weights.k_features), doc, reset, state, window=window,
      scale=scale, rotary_base=rotary_base, buffered=buffered, guard=guard)

  # Memory: step t folds in the token at t - W, if it belongs to t's document (otherwise it
  # left with the reset that started t's document).
  same_doc = same_doc[:, :, None, None]
  inserted_features = jnp.where(same_doc, kf_in, 0.0)
  ones = jnp.ones(v_in.shape[:-1] + (1,), f32)
  inserted_values = jnp.where(same_doc, jnp.concatenate([v_in, ones], axis=-1), 0.0)
  skip = empty_lead(window, time, state=state, axis_name=axis_name, guard=guard)
  *engine_in, engine_reset = after_lead(skip, weights.q_features.astype(f32), inserted_features,
                                        inserted_values, weights.log_decay, reset)
  memory_out, memory = run_engine(
      (plan.engine, plan.engine_grad), *engine_in,
      initial_state=None if state is None else state.memory, reset=engine_reset, guard=guard)
  memory_out = before_lead(skip, memory_out)
  if axis_name is not None:
    memory_out, memory = sequence_parallel.combine_shards(
        memory_out, memory, weights.q_features.astype(f32),
        sequence_parallel.folded_log_decay(weights.log_decay, reset),
        jnp.zeros_like(memory) if incoming is None else incoming.memory, axis_name)
  o = combine_memories(num, den, top, memory_out, value_dim, weights.gate).astype(out_dtype)
  if not return_state:
    return o
  (keys, values, key_features), doc_start, end, memory = state_after(
      tails, state, reset, memory, time=time, rotary_base=rotary_base, axis_name=axis_name)
  return o, DCAState(keys=keys, values=values, key_features=key_features, doc_start=doc_start,
                     memory=memory, position=end)
