"""The gated delta rule: a matrix memory that overwrites associations instead of adding to them.

For every batch row and head (B batch, T time, H heads, K key dim, V value dim, C chunk):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   a_t = exp(g_t),   o_t = S_t^T q_t,

from S_0 = `initial_state`. Reading the memory at k_t gives S^T k_t; the update moves that read
towards v_t by the fraction beta_t (with |k_t| = 1: S_t^T k_t = a_t (1 - beta_t) S_{t-1}^T k_t +
beta_t v_t), so beta_t = 1 replaces the value stored under k_t. Written with the pseudo-value

    u_t = beta_t (v_t - a_t S_{t-1}^T k_t),   the update is   S_t = a_t S_{t-1} + k_t u_t^T,

a gated linear attention over (k, u) whose values u depend on the state.

Forms (all compute the same function):

* `recurrent`: `jax.lax.scan` over tokens, O(T K V) time, O(K V) live state.
* `associative`: `jax.lax.associative_scan` over the per-token affine maps S -> A_t S + B_t with
  A_t = a_t (I - beta_t k_t k_t^T), B_t = beta_t k_t v_t^T (`combine_affine_maps`); O(T K (K+V))
  memory. For tests and parallel hardware at small K.
* `chunked` (module function `chunked`): chunks of C tokens, each solved in closed form (the
  WY/UT representation below), chunk states by a sequential scan over T/C chunks.
* `quadratic`: the chunked form's closed form on one chunk holding the whole sequence, O(T^2)
  memory; for tests and tiny T.

The chunked form. Inside a chunk with entering state S, let G_i = g_1 + ... + g_i (decay from the
chunk start to token i, inclusive), D_ij = g_{j+1} + ... + g_i for j <= i (the decay between
tokens j and i) and E_j = g_{j+1} + ... + g_C (from j to the chunk end). Unrolling
S_i = a_i S_{i-1} + k_i u_i^T inside the chunk,

    a_i S_{i-1} = exp(G_i) S + sum_{j < i} exp(D_ij) k_j u_j^T,

so the pseudo-values solve the unit lower-triangular system (the UT transform)

    u_i + beta_i sum_{j < i} exp(D_ij) (k_i . k_j) u_j = beta_i v_i - beta_i exp(G_i) S^T k_i,
    i.e.  (I + L) U = diag(beta) V - diag(beta exp(G)) K S,    U = U' - W S,

with U' = (I + L)^-1 diag(beta) V [C, V] and W = (I + L)^-1 diag(beta exp(G)) K [C, K] (one
triangular solve with both right-hand sides). Then, with M_ij = exp(D_ij) q_i . k_j (j <= i) and
K'_j = exp(E_j) k_j,

    O     = (diag(exp(G)) Q - M W) S + M U'                 (the chunk's outputs)
    S_end = (exp(G_C) I - K'^T W) S + K'^T U'               (the chunk's affine map S -> A S + B)

so the chunk-to-chunk recurrence S_n = A_n S_{n-1} + B_n is a `jax.lax.scan` over chunks (one
K x K by K x V matmul per chunk: sequential, which is what a CPU runs best; an associative scan
would cost K^3 per combine), and everything else is batched matmuls over chunks. Every decay is
a direct sum of log decays (`quadratic.head_decay_weights`, `prefix_sum`,
`reverse_exclusive_cumsum`), never a difference of prefix sums, so exp is only ever taken of a
sum of non-positive terms: nothing overflows and a reset (g = -inf) gives exact zeros, not NaN.
With |k| = 1 and beta in [0, 1] every factor (I - beta k k^T) has norm <= 1 and the entries of L
are bounded by 1. The chunked form's JVP (`_gauge_jvp`) holds the log decays fixed and moves
their tangent onto the queries and values (the state is linear in the values), so reverse mode
never differentiates the decays through the solve.

Internal contract of the forms (the public wrapper `delta_rule_attention` checks the inputs and
establishes it): q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g [B, T, H], all float32,
g in [-inf, 0] with resets folded in as g = -inf; s0 [B, H, K, V] float32. Each form returns
(o [B, T, H, V], S_T [B, H, K, V]), both float32.

References:
  Yang, Kautz and Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
  (ICLR 2025): the gated delta rule and its chunkwise form; Yang et al. 2024, "Parallelizing
  Linear Transformers with the Delta Rule over Sequence Length" (NeurIPS 2024): the WY/UT
  representation; Schlag, Irie and Schmidhuber 2021, "Linear Transformers Are Secretly Fast
  Weight Programmers": the delta rule as a fast-weight update. (Section and equation numbers not
  checked against the papers here.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from dca_jax.ops import _checks, segments, sequence_parallel
from dca_jax.ops.chunked import jvp_of_nonzero
from dca_jax.ops.planner import EnginePlan, Mode, delta_rule_plans
from dca_jax.ops.quadratic import head_decay_weights, prefix_sum, reverse_exclusive_cumsum
from dca_jax.ops.rowwise import row_dot, scale_rows


def delta_rule_attention(q, k, v, beta, log_decay, *, initial_state=None, reset=None, mode="auto",
                         chunk_size=None, return_final_state=False, axis_name=None):
  """Gated delta rule attention: a K x V matrix memory updated by error correction, with decay.

  For every batch row and head (B batch, T time, H heads, K key dim, V value dim):

      S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   a_t = exp(log_decay_t),
      o_t = S_t^T q_t,

  from S_0 = `initial_state` (zeros if None). No scaling is applied: scale q beforehand. Keys are
  expected L2-normalised (|k_t| = 1) by the caller, who normalises them as the model requires;
  they are not normalised here. With unit keys and beta in [0, 1] every (I - beta_t k_t k_t^T)
  has norm <= 1, so the state cannot grow without bound, nor can the pseudo-values that the
  chunked form's triangular systems solve for; other keys give the same recurrence but no such
  guarantee.
  Where `reset[b, t]` is true, the state carried into step t is dropped (a_t = 0), so a new
  document starts at t (S_t = beta_t k_t v_t^T).

  | mode        | time                                 | memory               | use            |
  |-------------|--------------------------------------|----------------------|----------------|
  | recurrent   | O(T K V)                             | O(K V)               | decoding, CPU  |
  | associative | O(T K^2 (K+V)) work                  | O(T K (K+V))         | tests          |
  | chunked     | O(T C (K+V) + T K (K+V) + T K^2 V/C) | O(T/C K (K+V) + T C) | training       |
  | quadratic   | O(T^2 (K+V))                         | O(T^2 + T (K+V))     | tests, tiny T  |

  "auto" (the default) uses the chunked form with C = `chunk_size` when T > C, else the
  recurrent form; on CPU, a call that is evaluated without being differentiated runs the
  recurrent form whatever T, while its gradient follows the rule above (the same function either
  way; this follows the rule measured for the engine, see `planner`, and is not yet measured for
  the delta rule). States and accumulations are float32 whatever the input dtype; any T >= 1 and any
  chunk size work (the last chunk is padded with tokens that leave the state unchanged). Very
  negative and -inf log decays are exact: no form exponentiates a positive sum of log decays.
  Non-finite q, k, v or beta at a token make exactly the outputs that can see that token NaN.

  Args:
    q: [B, T, H, K] queries.
    k: [B, T, H, K] keys, L2-normalised along K by the caller.
    v: [B, T, H, V] values.
    beta: [B, T, H] writing strengths, in [0, 1] (checked when the values are concrete).
    log_decay: [B, T, H] log decays, one per head and token, in [-inf, 0].
    initial_state: optional [B, H, K, V] state to continue from.
    reset: optional bool [B, T]; true where a new document starts.
    mode: "auto", "recurrent", "associative", "chunked" or "quadratic" (or a `Mode`).
    chunk_size: C, the chunk length of the chunked form and the T above which "auto" chunks
      (default: the engine planner's, 64 on CPU and GPU, 128 on TPU).
    return_final_state: also return S_T.
    axis_name: None (one device), or the name of the mesh axis that T is sharded over, inside
      `jax.shard_map` (as `gated_linear_attention`'s): each shard summarises its tokens as the
      affine map S -> A S + U (A [K, K]: a local pass with v = 0 from S = I; U: a local pass
      from S = 0), one `all_gather` of the maps, a fold of the shards before it, then its own
      pass again from the state that enters it (three local passes in all). `initial_state`
      enters the first shard; the final state is the whole sequence's on every shard.

  Returns:
    o [B, T, H, V] in the dtype of q, k and v (promoted), or (o, S_T) with S_T float32
    [B, H, K, V] when `return_final_state` is true.

  Raises:
    ValueError: on wrong ranks or mismatched dimensions, T = 0, a positive or NaN log decay or a
      beta outside [0, 1] (both checked when the values are concrete), an unknown mode, a chunk
      size < 1 or an `axis_name` that is not a mesh axis bound here.
    TypeError: on non-floating inputs or a non-boolean reset.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 10, 2, 4))
    >>> k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    >>> v = jnp.ones((1, 10, 2, 3))
    >>> beta = jnp.full((1, 10, 2), 0.5)
    >>> log_decay = jnp.full((1, 10, 2), -0.1)
    >>> o, state = delta_rule_attention(q, k, v, beta, log_decay, mode="chunked", chunk_size=4,
    ...                                 return_final_state=True)
    >>> o.shape, state.shape
    ((1, 10, 2, 3), (1, 2, 4, 3))

  References:
    Yang, Kautz and Hatamizadeh 2025, "Gated Delta Networks" (the recurrence, chunkwise form);
    Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length" (the WY/UT representation). See the module doc.
  """
  mode = Mode.parse(mode)
  batch, time, heads, key_dim, value_dim = _checks.check_qkv(q, k, v)
  for name, x in (("beta", beta), ("log_decay", log_decay)):
    _checks.check_array(name, x, 3)
    for axis, what, size in ((0, "batch size B", batch), (1, "length T", time), (2, "heads H", heads)):
      _checks.check_dim(name, x, axis, size, what + " (must match q; shape [B, T, H])")
  _checks.check_nonpositive("log_decay", log_decay)
  _checks.check_unit_interval("beta", beta)
  _checks.check_state("initial_state", initial_state, (batch, heads, key_dim, value_dim))
  _checks.check_reset(reset, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
  if axis_name is not None:
    sequence_parallel.check_axis_name(axis_name)

  plans = delta_rule_plans(time, mode=mode, chunk_size=chunk_size)
  if axis_name is not None:
    plans = (plans[1], plans[1])     # one plan: see gated_linear_attention
  return _compiled_delta_rule(q, k, v, beta, log_decay, initial_state, reset, plans=plans,
                              axis_name=axis_name, return_final_state=return_final_state)


@functools.partial(jax.jit, static_argnames=("plans", "axis_name", "return_final_state"))
def _compiled_delta_rule(q, k, v, beta, log_decay, initial_state, reset, *, plans, axis_name,
                         return_final_state):
  """`delta_rule_attention` on checked inputs with its plans made, one compiled program (see
  `gla._compiled_engine`)."""
  out_dtype = jnp.result_type(q, k, v)
  if axis_name is not None:
    initial_state = entering_state(plans, q, k, v, beta, log_decay, initial_state, reset,
                                    axis_name)
  o, final = run_delta_rule(plans, q, k, v, beta, log_decay, initial_state=initial_state,
                            reset=reset)
  if axis_name is not None:
    index = jax.lax.axis_index(axis_name)
    last = jax.lax.axis_size(axis_name) - 1
    # The last shard's final state is the sequence's; a psum of it gives every shard the same,
    # invariant value (out_specs=P() is accepted by shard_map with check_vma on).
    final = jax.lax.psum(jnp.where(index == last, final, 0.0), axis_name)
  o = o.astype(out_dtype)
  return (o, final) if return_final_state else o


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(|x|^2 + eps) along the last axis: the unit keys (and queries) of the delta rule.

  The eps keeps the gradient finite at x = 0 (a zero key stays zero) and makes |result| < 1, so
  the delta rule's factors (I - beta k k^T) keep a norm <= 1.

  Args:
    x: [..., K].
    eps: added to the squared norm.

  Returns:
    [..., K] in x's dtype (the sum of squares in float32 at least).

  Example:
    >>> import jax.numpy as jnp
    >>> l2_normalize(jnp.array([3.0, 4.0]), eps=0.0).tolist()
    [0.6000000238418579, 0.800000011920929]
  """
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  # row_dot and scale_rows: the plain products, with a faster backward on XLA:CPU (rowwise).
  return scale_rows(wide, jax.lax.rsqrt(row_dot(wide, wide) + eps)).astype(x.dtype)


def entering_state(plans, q, k, v, beta, log_decay, initial_state, reset, axis_name):
  """The state entering this shard of a sequence sharded over `axis_name` (see
  `delta_rule_attention`), float32 [B, H, K, V]."""
  batch, _, heads, key_dim = q.shape
  f32 = jnp.float32
  zeros = sequence_parallel.varying(jnp.zeros((batch, heads, key_dim, v.shape[-1]), f32),
                                    axis_name, like=q)
  _, updates = run_delta_rule(plans, q, k, v, beta, log_decay, initial_state=zeros,
                              reset=reset)                                     # U [B, H, K, V]
  identity = jnp.broadcast_to(jnp.eye(key_dim, dtype=f32), (batch, heads, key_dim, key_dim))
  _, maps = run_delta_rule(plans, q, k, jnp.zeros(k.shape, f32), beta, log_decay,
                           initial_state=sequence_parallel.varying(identity, axis_name, like=q),
                           reset=reset)                                        # A [B, H, K, K]
  maps = jax.lax.all_gather(maps, axis_name)
  updates = jax.lax.all_gather(updates, axis_name)
  cum_maps, cum_updates = jax.lax.associative_scan(combine_affine_maps, (maps, updates), axis=0)
  s0 = sequence_parallel.zeros_state(batch, heads, key_dim, v.shape[-1], initial_state)
  index = jax.lax.axis_index(axis_name)
  before = jnp.maximum(index - 1, 0)
  entering = jnp.where(index > 0, cum_maps[before] @ s0 + cum_updates[before], s0)
  return sequence_parallel.varying(entering, axis_name, like=q)


def run_delta_rule(plans: tuple[EnginePlan, EnginePlan], q, k, v, beta, log_decay, *,
                   initial_state=None, reset=None, guard: bool = True):
  """The delta rule on checked inputs with plans already made (`delta_rule_plans`).

  Casts to float32, zeroes non-finite tokens (and marks as NaN the outputs that can see them, as
  `gla.run_engine` does; `guard=False` skips that, as there), folds resets into the decays and
  evaluates `plans[0]`, differentiating through `plans[1]` when they differ.

  Returns:
    (o [B, T, H, V], S_T [B, H, K, V]), both float32.
  """
  f32 = jnp.float32
  q, k, v, beta, g = (x.astype(f32) for x in (q, k, v, beta, log_decay))
  batch, _, heads, key_dim = q.shape
  if initial_state is None:
    s0 = jnp.zeros((batch, heads, key_dim, v.shape[-1]), f32)
  else:
    s0 = initial_state.astype(f32)
  # A corrupt token must not leak into the past or into another document through 0 x NaN: zero
  # it (a select) and poison the outputs that can see it afterwards. g = -inf is valid.
  if guard:
    bad_q = segments.nonfinite(q)                                                # [B, T, H]
    bad_kv = (segments.nonfinite(k) | segments.nonfinite(v) | segments.nonfinite(beta[..., None])
              | segments.nonfinite(g[..., None], allow_neg_inf=True))
    bad_state = jnp.any(~jnp.isfinite(s0), axis=(-2, -1))                       # [B, H]
    q, = segments.zero_where(bad_q, q)
    k, v = segments.zero_where(bad_kv, k, v)
    beta, g = (jnp.where(bad_kv, 0.0, x) for x in (beta, g))
    s0 = jnp.where(bad_state[..., None, None], 0.0, s0)
  if reset is not None:
    g = jnp.where(reset[:, :, None], -jnp.inf, g)
  forward, grad = plans
  if forward == grad:
    o, final = _run(forward, q, k, v, beta, g, s0)
  else:
    o, final = _auto(forward, grad, q, k, v, beta, g, s0)
  if not guard:
    return o, final
  doc = None if reset is None else segments.document_ids(reset)
  poisoned = segments.sees_nonfinite(bad_kv, doc, carried=bad_state) | bad_q
  o = jnp.where(poisoned[..., None], jnp.nan, o)
  final = jnp.where(poisoned[:, -1, :, None, None], jnp.nan, final)
  return o, final


def _run(plan: EnginePlan, q, k, v, beta, g, s0):
  """Evaluates one concrete form (internal contract in the module doc)."""
  if plan.mode is Mode.RECURRENT:
    return recurrent(q, k, v, beta, g, s0)
  if plan.mode is Mode.ASSOCIATIVE:
    return associative(q, k, v, beta, g, s0)
  if plan.mode is Mode.QUADRATIC:
    return chunked(q, k, v, beta, g, s0, chunk_size=q.shape[1])
  return chunked(q, k, v, beta, g, s0, chunk_size=plan.chunk_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _auto(forward_plan, grad_plan, q, k, v, beta, g, s0):
  """The forward plan when evaluated, the gradient plan when differentiated (as `gla._auto`)."""
  return _run(forward_plan, q, k, v, beta, g, s0)


@_auto.defjvp
def _auto_jvp(forward_plan, grad_plan, primals, tangents):
  del forward_plan
  return jax.jvp(functools.partial(_run, grad_plan), primals, tangents)


def recurrent(q, k, v, beta, g, s0):
  """Recurrent form: `jax.lax.scan` over tokens with a [B, H, K, V] float32 carry.

  Each step reads the memory at the key, S^T k (O(K V)), and writes the correction:
  S <- a (S - beta k (S^T k)^T) + beta k v^T.
  """
  def step(state, inputs):
    q_t, k_t, v_t, beta_t, g_t = inputs
    read = jnp.einsum("bhk,bhkv->bhv", k_t, state)
    decay = jnp.exp(g_t)[..., None, None]
    state = decay * (state - beta_t[..., None, None] * k_t[..., :, None] * read[..., None, :])
    state = state + beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

  time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, g)]
  final, o = jax.lax.scan(step, s0, time_major)
  return jnp.swapaxes(o, 0, 1), final


def combine_affine_maps(earlier, later):
  """Associative combine of two segments of the recurrence S -> A S + B (A [.., K, K]).

  Applying `earlier` then `later` gives A2 (A1 S + B1) + B2, so

      (A1, B1) o (A2, B2) = (A2 A1, A2 B1 + B2).

  Composition of affine maps is associative, which is what `jax.lax.associative_scan` needs.

  Args:
    earlier: (A1 [..., K, K], B1 [..., K, V]).
    later: (A2, B2), same shapes.

  Returns:
    (A, B) summarising both segments, same shapes.
  """
  a1, b1 = earlier
  a2, b2 = later
  return a2 @ a1, a2 @ b1 + b2


def associative(q, k, v, beta, g, s0):
  """Associative form: `jax.lax.associative_scan` of `combine_affine_maps` over tokens.

  Token t is the map S -> A_t S + B_t, A_t = a_t (I - beta_t k_t k_t^T), B_t = beta_t k_t v_t^T.
  Every prefix map is materialised ([B, T, H, K, K] and [B, T, H, K, V]).
  """
  key_dim = q.shape[-1]
  write = beta[..., None, None] * k[..., :, None]                              # [B, T, H, K, 1]
  maps = jnp.exp(g)[..., None, None] * (jnp.eye(key_dim, dtype=k.dtype) - write * k[..., None, :])
  updates = write * v[..., None, :]
  cum_maps, cum_updates = jax.lax.associative_scan(combine_affine_maps, (maps, updates), axis=1)
  states = cum_maps @ s0[:, None] + cum_updates                                # S_t, t = 1..T
  o = jnp.einsum("bthk,bthkv->bthv", q, states)
  return o, states[:, -1]


# Rows per diagonal block of `unit_lower_solve`.
SOLVE_BLOCK = 16


def _strict_lower(x: jax.Array) -> jax.Array:
  """x [..., C, C] with zeros on and above the diagonal."""
  index = jnp.arange(x.shape[-1])
  return jnp.where(index[:, None] > index[None, :], x, 0.0)


def unit_lower_inverse(lower: jax.Array, *, block: int = SOLVE_BLOCK) -> jax.Array:
  """(I + L)^-1 for L strictly lower triangular (only that triangle of `lower` is read).

  Blocked forward substitution, written with matmuls and elementwise ops only.
  `jax.scipy.linalg.solve_triangular` would be the obvious call, but on CPU (jaxlib 0.10.2) it
  lowers to LAPACK trsm behind a batch loop on XLA's intra-op thread pool, and two such calls
  that XLA runs at the same time can each wait for pool threads the other holds: a training
  step of the delta rule then hangs for ever with every thread idle (seen with gdb: two
  `lapack_strsm_ffi` threads in `jax::ParallelBatchMap` waiting on a `BlockingCounter`, the
  main thread in `xla::Semaphore::Acquire`).

  The rows are cut into blocks of `block`. Each diagonal block's inverse T_jj = (I + L_jj)^-1
  comes from row-by-row substitution (T_i = e_i - L_i T, rows in order, all diagonal blocks at
  once); then each block row of the inverse below the diagonal, in order:
      [T_j0 .. T_j,j-1] = -T_jj L_j,<j T_<j,<j,
  one matmul pair per block row. No power series (sum of (-L)^n): with repeated keys L can be
  all ones below the diagonal, whose powers reach C(63, 31) ~ 1e18 before cancelling.

  Args:
    lower: [..., C, C].
    block: rows per diagonal block (C is padded with identity rows to a multiple).

  Returns:
    [..., C, C] unit lower-triangular, lower's dtype.
  """
  size = lower.shape[-1]
  block = max(1, min(block, size))
  n_blocks = -(-size // block)
  pad = n_blocks * block - size
  lower = _strict_lower(lower)
  if pad:
    lower = jnp.pad(lower, [(0, 0)] * (lower.ndim - 2) + [(0, pad), (0, pad)])
  lead = lower.shape[:-2]
  rows = lower.reshape(lead + (n_blocks, block, n_blocks, block))
  diag = jnp.diagonal(rows, axis1=-4, axis2=-2)                         # [..., b, b, n_blocks]
  diag = jnp.moveaxis(diag, -1, -3)                                     # [..., n_blocks, b, b]
  eye = jnp.eye(block, dtype=lower.dtype)
  inverse_rows = [eye[0] * jnp.ones(diag.shape[:-2] + (1,), lower.dtype)]
  for i in range(1, block):
    done = jnp.stack(inverse_rows, axis=-2)                             # [..., n_blocks, i, b]
    inverse_rows.append(eye[i] - jnp.einsum("...j,...jk->...k", diag[..., i, :i], done))
  diag_inverse = jnp.stack(inverse_rows, axis=-2)                       # [..., n_blocks, b, b]
  inverse = diag_inverse[..., 0, :, :]                                  # T_<1,<1
  for j in range(1, n_blocks):
    own = diag_inverse[..., j, :, :]
    left = lower[..., j * block:(j + 1) * block, :j * block]           # L_j,<j
    below = -(own @ (left @ inverse))                                   # [..., b, j b]
    zeros = jnp.zeros(lead + (j * block, block), lower.dtype)
    inverse = jnp.concatenate([jnp.concatenate([inverse, zeros], axis=-1),
                               jnp.concatenate([below, own], axis=-1)], axis=-2)
  return inverse[..., :size, :size]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _solve(lower: jax.Array, rhs: jax.Array, block: int) -> jax.Array:
  return unit_lower_inverse(lower, block=block) @ rhs


@_solve.defjvp
def _solve_jvp(block, primals, tangents):
  # X = (I + L)^-1 R  =>  dX = (I + L)^-1 (dR - dL X), dL restricted to the strict lower
  # triangle (the only part read). Linear in the tangents and made of matmuls, so reverse mode
  # transposes it into two more matmuls: the substitution is run once, never differentiated.
  lower, rhs = primals
  d_lower, d_rhs = tangents
  inverse = unit_lower_inverse(lower, block=block)
  x = inverse @ rhs
  return x, inverse @ (d_rhs - _strict_lower(d_lower) @ x)


def unit_lower_solve(lower: jax.Array, rhs: jax.Array, *, block: int = SOLVE_BLOCK) -> jax.Array:
  """X with (I + L) X = R, for L strictly lower triangular (only that triangle is read).

  X = T R with T = (I + L)^-1 from `unit_lower_inverse`, under a `custom_jvp` whose tangent
  T (dR - dL X) is built of matmuls, so the substitution is run once and never differentiated
  (autodiff of it, a chain of small sequential steps transposed again in the backward pass, was
  most of the chunked form's training time; the engine section of `python -m
  experiments.performance` times the form).

  Args:
    lower: [..., C, C].
    rhs: [..., C, N].
    block: rows per diagonal block of the substitution.

  Returns:
    [..., C, N], rhs's dtype.
  """
  return _solve(lower, rhs, max(1, min(int(block), lower.shape[-1])))


def chunked(q, k, v, beta, g, s0, *, chunk_size: int):
  """Chunked form (WY/UT representation per chunk, module doc). Internal contract as above.
  Differentiated through `_gauge_jvp`."""
  return _gauged_chunked(q, k, v, beta, g, s0, chunk_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _gauged_chunked(q, k, v, beta, g, s0, chunk_size):
  return _plain_chunked(q, k, v, beta, g, s0, chunk_size=chunk_size)


def _gauge_jvp(chunk_size, primals, tangents):
  """The chunked form's JVP with the log decays' tangent moved onto the queries and values.

  The state is linear in the values and the initial state, and a_t = exp(g_t) multiplies the
  whole transition at t, so shifting g_t by e multiplies exactly the contributions that cross t
  (of v_j, j < t, and of S_0 to S_i, i >= t) by e^e; so does scaling the queries at i >= t by
  e^e, the values at j >= t by e^-e and the final state by e^e. With G the tangent of the prefix
  sum of g, the tangent is that of the form at fixed g along dq + q G, dv - v G (k, beta, S_0
  as given), plus G_T S_T on the final state; reverse mode gets dg_t = sum_{i >= t} (q_i . dq_i
  - v_i . dv_i) + <dS_T, S_T> (as `chunked._gauge_jvp` for gated linear attention, with the
  values in the keys' place), instead of differentiating the decays through the solve.
  """
  q, k, v, beta, g, s0 = primals
  dq, dk, dv, dbeta, dg, ds0 = tangents
  zero = lambda t: isinstance(t, SymbolicZero)
  if not zero(dg):
    gauge = prefix_sum(dg, axis=1)                                              # [B, T, H]
    # As an einsum, so that the gauge's cotangent (a row dot) is a dot_general (`rowwise`).
    by_gauge = lambda x: jnp.einsum("...k,...->...k", x, gauge,
                                    precision=jax.lax.Precision.HIGHEST)
    dq = by_gauge(q) if zero(dq) else dq + by_gauge(q)
    dv = -by_gauge(v) if zero(dv) else dv - by_gauge(v)
  at_fixed_g = lambda q, k, v, beta, s0: _plain_chunked(q, k, v, beta, g, s0,
                                                       chunk_size=chunk_size)
  out, (do, dfinal) = jvp_of_nonzero(at_fixed_g, (q, k, v, beta, s0), (dq, dk, dv, dbeta, ds0))
  if not zero(dg):
    dfinal = dfinal + jnp.einsum("bh,bhkv->bhkv", gauge[:, -1], out[1],
                                 precision=jax.lax.Precision.HIGHEST)            # G_T S_T
  return out, (do, dfinal)


_gauged_chunked.defjvp(lambda *args: _gauge_jvp(*args), symbolic_zeros=True)


def _plain_chunked(q, k, v, beta, g, s0, *, chunk_size: int):
  """The chunked form, differentiated by plain autodiff (`chunked` with its rule)."""
  batch, time, heads, key_dim = q.shape
  chunk = chunk_size
  n_chunks = -(-time // chunk)
  pad = n_chunks * chunk - time
  # Padding tokens (k = v = q = 0, beta = 0, g = 0) leave outputs and the state unchanged.
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  beta, g = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (beta, g))

  def blocks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
    x = x.reshape((batch, n_chunks, chunk, heads) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, beta, g = (blocks(x) for x in (q, k, v, beta, g))

  # Decays as direct sums of log decays: into (G_i), between (D_ij, j <= i), after (E_j).
  into = prefix_sum(g, axis=-1)                                                # [B, H, N, C]
  after = reverse_exclusive_cumsum(g, axis=-1)
  between = head_decay_weights(g)                           # [B, H, N, C, C]: exp(D_ij), j <= i
  index = jnp.arange(chunk)
  strict = index[:, None] > index[None, :]

  # The UT transform: (I + L) [W, U'] = [diag(beta exp(G)) K, diag(beta) V].
  lower = jnp.where(strict, scale_rows(between * jnp.einsum("...ik,...jk->...ij", k, k), beta),
                    0.0)
  rhs = jnp.concatenate([scale_rows(k, beta * jnp.exp(into)), scale_rows(v, beta)], axis=-1)
  solution = unit_lower_solve(lower, rhs)
  w, u = solution[..., :key_dim], solution[..., key_dim:]

  # Per chunk: outputs O = P S + R and the end state S_end = A S + B of the entering state S.
  scores = between * jnp.einsum("...ik,...jk->...ij", q, k)                    # M, causal
  p = scale_rows(q, jnp.exp(into)) - scores @ w                                # [B, H, N, C, K]
  r = scores @ u                                                               # [B, H, N, C, V]
  k_after = scale_rows(k, jnp.exp(after))
  total = jnp.exp(jnp.sum(g, axis=-1))[..., None, None]                        # [B, H, N, 1, 1]
  maps = total * jnp.eye(key_dim, dtype=k.dtype) - jnp.swapaxes(k_after, -1, -2) @ w  # [B,H,N,K,K]
  updates = jnp.swapaxes(k_after, -1, -2) @ u                                  # [B, H, N, K, V]

  def step(state, chunk_map):
    a, b = chunk_map
    return a @ state + b, state

  final, entering = jax.lax.scan(step, s0, (jnp.moveaxis(maps, 2, 0), jnp.moveaxis(updates, 2, 0)))
  o = p @ jnp.moveaxis(entering, 0, 2) + r                                     # [B, H, N, C, V]
  o = jnp.moveaxis(o.reshape(batch, heads, n_chunks * chunk, -1), 1, 2)
  return o[:, :time], final
