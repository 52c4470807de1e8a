"""Public entry point of the engine: `gated_linear_attention` in any of its four forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks, segments, sequence_parallel
from dca_jax.ops.chunked import chunked
from dca_jax.ops.planner import CHUNK_SIZE, DEFAULT_CHUNK_SIZE, EnginePlan, Mode, engine_plans
from dca_jax.ops.quadratic import quadratic
from dca_jax.ops.scan import associative, recurrent


def gated_linear_attention(q, k, v, log_decay, *, initial_state=None, reset=None, mode="auto",
                           chunk_size=None, return_final_state=False, axis_name=None):
  """Gated linear attention: a linear recurrence over a K x V matrix state with data-dependent decay.

  For every batch row and head (B batch, T time, H heads, K key dim, V value dim):

      S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,

  from S_0 = `initial_state` (zeros if None). No scaling is applied: scale q beforehand. Where
  `reset[b, t]` is true, the state carried into step t is dropped, so a new document starts at t
  (S_t = k_t v_t^T). All forms compute the same function; they differ in cost:

  | mode        | time            | memory      | use                          |
  |-------------|-----------------|-------------|------------------------------|
  | recurrent   | O(T K V)        | O(K V)      | decoding, reference          |
  | associative | O(T K V) work   | O(T K V)    | parallel hardware, short T   |
  | chunked     | O(T C (K+V) + T K V) | O(T/C K V + T C) | training, prefill  |
  | quadratic   | O(T^2 K)        | O(T^2 K)    | tests, tiny T                |

  States and accumulations are float32 whatever the input dtype; any T >= 1 and any chunk size
  work (inputs are padded internally). Very negative and -inf log decays are exact (they erase
  the state): no form ever exponentiates a positive sum of log decays.

  Args:
    q: [B, T, H, K] queries.
    k: [B, T, H, K] keys.
    v: [B, T, H, V] values.
    log_decay: [B, T, H, K] (one decay per key channel, as in GLA) or [B, T, H] (one per head, as
      in Mamba-2/RetNet); values in [-inf, 0].
    initial_state: optional [B, H, K, V] state to continue from.
    reset: optional bool [B, T]; true where a new document starts.
    mode: "auto", "recurrent", "associative", "chunked" or "quadratic" (or a `Mode`). "auto"
      asks `plan_engine` (the rule measured by experiments/benchmark_engine.py).
    chunk_size: chunk length for the chunked form (default: the planner's choice).
    return_final_state: also return S_T.
    axis_name: None (one device), or the name of the mesh axis that T is sharded over, inside
      `jax.shard_map`: q, k, v, log_decay and reset are then this shard's slice of the sequence
      (contiguous, in mesh order), `initial_state` enters the first shard, and the result is
      this shard's outputs and the whole sequence's final state (the same on every shard). One
      `all_gather` of a [B, H, K (+1), V] summary per shard, whatever T
      (`dca_jax.ops.sequence_parallel`).

  Returns:
    o [B, T, H, V] in the dtype of the inputs, or (o, S_T) with S_T float32 [B, H, K, V] when
    `return_final_state` is true.

  Raises:
    ValueError: on wrong ranks or mismatched dimensions, a positive log decay (checked when the
      values are concrete), an unknown mode, a chunk size < 1 or an `axis_name` that is not a
      mesh axis bound here.
    TypeError: on non-floating inputs or a non-boolean reset.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q = k = jax.random.normal(jax.random.key(0), (1, 10, 2, 4))
    >>> v = jnp.ones((1, 10, 2, 3))
    >>> log_decay = jnp.full((1, 10, 2), -0.1)
    >>> o, state = gated_linear_attention(q, k, v, log_decay, mode="chunked", chunk_size=4,
    ...                                   return_final_state=True)
    >>> o.shape, state.shape
    ((1, 10, 2, 3), (1, 2, 4, 3))

    The same with T split over the devices of a mesh (one device here; run with
    XLA_FLAGS=--xla_force_host_platform_device_count=8 for eight):

    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()), ("seq",))
    >>> t = 4 * jax.device_count()
    >>> q = k = jax.random.normal(jax.random.key(0), (1, t, 2, 4))
    >>> v, log_decay = jnp.ones((1, t, 2, 3)), jnp.full((1, t, 2), -0.1)
    >>> sharded = jax.shard_map(
    ...     lambda q, k, v, g: gated_linear_attention(q, k, v, g, axis_name="seq"), mesh=mesh,
    ...     in_specs=(P(None, "seq"),) * 4, out_specs=P(None, "seq"))
    >>> bool(jnp.allclose(sharded(q, k, v, log_decay), gated_linear_attention(q, k, v, log_decay),
    ...                   atol=1e-5))
    True

  References:
    Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
    eq. (3) and sec. 4; Katharopoulos et al. 2020, "Transformers are RNNs", sec. 3.2.
  """
  mode = Mode.parse(mode)
  batch, time, heads, key_dim, value_dim = _checks.check_qkv(q, k, v)
  _checks.check_array("log_decay", log_decay, (3, 4))
  for axis, what, size in ((0, "batch size B", batch), (1, "length T", time), (2, "heads H", heads)):
    _checks.check_dim("log_decay", log_decay, axis, size, what + " (must match q)")
  if log_decay.ndim == 4:
    _checks.check_dim("log_decay", log_decay, 3, key_dim, "key dim K (must match q)")
  _checks.check_nonpositive("log_decay", log_decay)
  _checks.check_state("initial_state", initial_state, (batch, heads, key_dim, value_dim))
  _checks.check_reset(reset, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
  if axis_name is not None:
    sequence_parallel.check_axis_name(axis_name)

  plans = engine_plans(time, per_channel_decay=log_decay.ndim == 4 and key_dim > 1, mode=mode,
                       chunk_size=chunk_size)
  if axis_name is not None:
    # One plan for evaluation and gradient: the custom_jvp that pairs two plans loses
    # shard_map's varying type of the state (jax 0.10.2).
    plans = (plans[1], plans[1])
  return _compiled_engine(q, k, v, log_decay, initial_state, reset, plans=plans,
                          axis_name=axis_name, return_final_state=return_final_state)


@functools.partial(jax.jit, static_argnames=("plans", "axis_name", "return_final_state"))
def _compiled_engine(q, k, v, log_decay, initial_state, reset, *, plans, axis_name,
                     return_final_state):
  """`gated_linear_attention` on checked inputs with its plans made, as one compiled program.

  Called eagerly, the forms would otherwise run op by op, each small op compiled on its own (a
  first call of the chunked form took ~10 s on the 2-core CPU, against ~1 s compiled whole);
  inside a caller's jit, vmap or grad this jit is inlined and costs nothing.
  """
  batch, _, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  out_dtype = jnp.result_type(q, k, v)
  if axis_name is None:
    o, final = run_engine(plans, q, k, v, log_decay, initial_state=initial_state, reset=reset)
  else:
    zeros = sequence_parallel.varying(
        jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32), axis_name, like=q)
    o, local_final = run_engine(plans, q, k, v, log_decay, initial_state=zeros, reset=reset)
    s0 = sequence_parallel.zeros_state(batch, heads, key_dim, value_dim, initial_state)
    o, final = sequence_parallel.combine_shards(
        o, local_final, q.astype(jnp.float32),
        sequence_parallel.folded_log_decay(log_decay, reset), s0, axis_name)
  o = o.astype(out_dtype)
  return (o, final) if return_final_state else o


def run_engine(plans: tuple[EnginePlan, EnginePlan], q, k, v, log_decay, *, initial_state=None,
               reset=None, guard: bool = True):
  """The engine on checked inputs with plans already made (see `planner.engine_plans`).

  Internal entry point for callers that have validated their inputs and planned once
  (`gated_linear_attention`, `attention_compress`): casts to float32, folds resets into the
  decays, and evaluates `plans[0]`, differentiating through `plans[1]` when they differ.
  `guard` confines non-finite inputs to the outputs that see them (below); False skips it, for
  callers whose inputs are finite by construction (the layers, which confine x themselves).

  Returns:
    (o [B, T, H, V], S_T [B, H, K, V]), both float32.
  """
  f32 = jnp.float32
  q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
  g = log_decay.astype(f32)
  if g.ndim == 3:
    g = g[..., None]
  batch, _, heads, key_dim = q.shape
  if initial_state is None:
    s0 = jnp.zeros((batch, heads, key_dim, v.shape[-1]), f32)
  else:
    s0 = initial_state.astype(f32)
  # Under shard_map the carry must vary over the mesh axes the inputs vary over (a zero state
  # made inside the shard is invariant; data=8, seq=1 met this), or the scans reject it.
  s0 = sequence_parallel.match_varying(s0, q, k, v, g)
  # Non-finite inputs are zeroed (a select) and the outputs that can see them set to NaN after:
  # a corrupt token must not leak into the past or into another document through 0 x NaN.
  # A log decay of -inf is valid (it erases the state).
  if guard:
    bad_q = segments.nonfinite(q)                                            # [B, T, H]
    bad_kv = (segments.nonfinite(k) | segments.nonfinite(v)
              | segments.nonfinite(g, allow_neg_inf=True))
    bad_state = jnp.any(~jnp.isfinite(s0), axis=(-2, -1))                   # [B, H]
    q, = segments.zero_where(bad_q, q)
    k, v, g = segments.zero_where(bad_kv, k, v, g)
    s0 = jnp.where(bad_state[..., None, None], 0.0, s0)
  if reset is not None:
    # Dropping the carried state at t is a decay of exp(-inf) = 0 at t, in every form alike.
    g = jnp.where(reset[:, :, None, None], -jnp.inf, g)
  forward, grad = plans
  if forward == grad:
    o, final = _run(forward, q, k, v, g, s0)
  else:
    o, final = _auto(forward, grad, q, k, v, g, s0)
  if not guard:
    return o, final
  doc = None if reset is None else segments.document_ids(reset)
  poisoned = segments.sees_nonfinite(bad_kv, doc, carried=bad_state) | bad_q
  o = jnp.where(poisoned[..., None], jnp.nan, o)
  final = jnp.where(poisoned[:, -1, :, None, None], jnp.nan, final)
  return o, final


def _run(plan: EnginePlan, q, k, v, g, s0):
  """Evaluates one concrete form (internal contract of `scan.py`)."""
  if plan.mode is Mode.RECURRENT:
    return recurrent(q, k, v, g, s0)
  if plan.mode is Mode.ASSOCIATIVE:
    return associative(q, k, v, g, s0)
  if plan.mode is Mode.QUADRATIC:
    return quadratic(q, k, v, g, s0)
  chunk = plan.chunk_size or CHUNK_SIZE.get(jax.default_backend(), DEFAULT_CHUNK_SIZE)
  return chunked(q, k, v, g, s0, chunk_size=chunk, segment_size=plan.segment_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _auto(forward_plan, grad_plan, q, k, v, g, s0):
  """The forward-only plan when evaluated; the gradient plan when differentiated.

  All forms compute the same function, so this is the same function with a faster way to
  evaluate it in each case (on CPU: the token scan without gradients, chunks with them). A
  `custom_jvp` whose rule is the gradient plan's own JVP: forward mode (jvp, jacfwd) uses it
  directly and reverse mode (grad, vjp) transposes it, so every kind of autodiff works.
  """
  return _run(forward_plan, q, k, v, g, s0)


@_auto.defjvp
def _auto_jvp(forward_plan, grad_plan, primals, tangents):
  del forward_plan
  return jax.jvp(functools.partial(_run, grad_plan), primals, tangents)
