"""Chunked form of gated linear attention: the fast path for training and prefill.

The sequence is cut into chunks of C tokens (the hierarchy tokens -> chunk summaries -> prefix
over chunks). With g the log decays and, inside chunk n,

    into_i  = g_{start..i}          (decay from the chunk start to token i, inclusive)
    after_j = g_{j+1..end}          (decay from token j to the chunk end)

the state entering chunk n is S_{n-1}, and

    o_i     = (q_i * exp(into_i))^T S_{n-1}  +  sum_{j <= i in chunk} A_ij v_j      (inter + intra)
    S_n     = exp(g_{chunk}) * S_{n-1} + sum_j (k_j * exp(after_j)) v_j^T          (chunk summary)

The chunk summaries (exp(g_chunk), U_n) are combined with `jax.lax.associative_scan` using
`combine_decayed_states`, so the state of every chunk is known after O(log(T/C)) steps. With one
decay per head and a pass of at most `MAX_CHUNK_MATRIX` chunks, the states are instead one
matmul S_n = sum_{m <= n} exp(g_{chunks m+1..n}) U_m + exp(g_{chunks 1..n}) S_0 with the causal
decay matrix of the chunk totals (the same function as the intra-chunk decays).

With one decay per head (D = 1) the decay factors out of the channel sum of the intra-chunk
scores A_ij = sum_c q_ic k_jc exp(g_{j+1..i, c}), so the [C, C] block is one matmul times the
exact decay matrix (`quadratic.head_decay_weights`).

With one decay per key channel it does not, and the usual factorisation
(q_i exp(into_i)) . (k_j exp(-into_j)) is unusable: exp(-into_j) overflows once a chunk decays by
more than ~88 nats (float32), which data-dependent decays easily reach, and into_i - into_j is a
difference of prefix sums, which cancels catastrophically after a very negative or -inf log
decay. Instead the chunk (C a power of two) is split in halves recursively. At level h = 1, 2, 4,
..., C/2 it is cut into blocks of 2h tokens, each a left half and a right half of h tokens that
meet at position mid (the right half's first token). Every pair j < i of the chunk lies in the
left and right halves of exactly one block (at the level of the highest bit in which i and j
differ), where the decay between them splits at mid into two direct sums:

    g_{j+1..i} = g_{j+1..mid-1} + g_{mid..i} = after_h(j) + into_h(i),

with into_h(i) the sum from the start of i's segment of h tokens to i (inclusive) and after_h(j)
the sum after j to the end of j's segment. Both are sums of non-positive terms, so every
exponential is <= 1, nothing overflows, -inf stays exact (exp(-inf) = 0 and is never multiplied
by inf), and the pair's score is a product of two diagonal scalings:

    A_ij = sum_c (q_ic exp(into_h(i)_c)) (k_jc exp(after_h(j)_c)),

so all (right half) x (left half) scores of a level are one batched matmul of h x h blocks. The
diagonal is A_ii = q_i . k_i (no decay). The segment sums of level 2h come from those of level h
by adding whole-segment totals (into_2h = into_h + total_h(left) on the right half, after_2h =
after_h + total_h(right) on the left half), again direct sums, and at h = C they are the chunk's
into and after. Cost per chunk: sum_h (C / 2h) h^2 K = C (C - 1) K / 2 multiply-adds, i.e. the
lower triangle of the per-head matmul, plus log2(C) exponentials per token and channel (each
level scales half of the queries and half of the keys).

Gradients: a pass's JVP (`_gauge_jvp`) holds the log decays fixed and moves their tangent onto
the queries and keys: shifting g_t scales exactly the products that cross t, as scaling the
queries after t up and the keys after t down does. Reverse mode then gets the log decays'
gradient as a reversed cumulative sum of q . dq - k . dk plus <dS_T, S_T>, and never
differentiates the decay matrices, the halving's exponentials or the scan's decays
(flash-linear-attention's chunked GLA backward uses the same identity).

References:
  Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
  sec. 4 (chunkwise form, secondary chunking); Dao & Gu 2024, "Transformers are SSMs" (Mamba-2),
  sec. 6 (chunked "segsum" algorithm for scalar decays).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from dca_jax.ops.quadratic import head_decay_weights, prefix_sum, reverse_exclusive_cumsum
from dca_jax.ops.rowwise import row_dot, scale_rows
from dca_jax.ops.scan import combine_decayed_states


# With one decay per head, the chunk states of a pass of at most this many chunks come from one
# [N, N] decay-matrix matmul with the chunk summaries rather than an associative scan (O(N^2 K V)
# multiply-adds instead of O(N K V), but one dense matmul instead of log2(N) rounds of slices and
# small products). On the 2-core CPU it made the DCA layer's fwd+bwd faster at N = 4 and 16
# (256- and 1024-token passes) in separate-process A/Bs (issue #11's notes); the bound of 64 is a
# judgement (N^2 grows), not a measured crossover. Longer passes keep the scan.
MAX_CHUNK_MATRIX = 64


def effective_chunk_size(chunk_size: int, per_channel: bool) -> int:
  """The chunk length actually used: per-channel decays round it up to a power of two.

  The halving of the per-channel intra-chunk scores (module doc) needs C = 2^L. The result is
  mathematically identical for every chunk size; only speed and memory differ.

  Args:
    chunk_size: the requested chunk length (>= 1).
    per_channel: whether the log decay has one value per key channel.

  Returns:
    `chunk_size` for per-head decays, the smallest power of two >= `chunk_size` otherwise.
  """
  if not per_channel:
    return chunk_size
  return 1 << (chunk_size - 1).bit_length()


def _halves(x, size):
  """[M, C, D] -> [M, C / (2 size), 2, size, D]: blocks of 2 size tokens, left and right halves."""
  return x.reshape(x.shape[0], -1, 2, size, x.shape[-1])


def _per_channel_scores(q, k, g):
  """Intra-chunk scores for per-channel decays, by recursive halving (see module doc).

  The batch axes are flattened into one on purpose: XLA's CPU backend (jax 0.10.2) crashes with a
  segmentation fault on some multiply-reduce fusions of rank 7, which the autodiff of a
  [B, H, N, blocks, 2, h, K] formulation produced; rank <= 5 here.

  Args:
    q: [M, C, K] queries (M = batch x heads x chunks; C a power of two).
    k: [M, C, K] keys.
    g: [M, C, K] log decays (<= 0, may be -inf).

  Returns:
    (A, into, after): A [M, C, C] the causal decayed scores (zero above the diagonal); into and
    after [M, C, K] the log decays from the chunk start to i (inclusive) and from j to the chunk
    end (exclusive of j), as direct sums.
  """
  rows, chunk, dim = q.shape
  scores = row_dot(q, k)[:, :, None, None]                    # [M, C, 1, 1]: A_ii, no decay
  into, after = g, jnp.zeros_like(g)                           # segments of h = 1 token
  size = 1
  while size < chunk:
    qh, kh, into_h, after_h = (_halves(x, size) for x in (q, k, into, after))
    # Queries of the right halves scaled from the meeting point mid, keys of the left halves to it.
    q_right = qh[:, :, 1] * jnp.exp(into_h[:, :, 1])
    k_left = kh[:, :, 0] * jnp.exp(after_h[:, :, 0])
    cross = jnp.einsum("mbik,mbjk->mbij", q_right, k_left)    # [M, blocks, h, h]
    # Assemble the [2h, 2h] blocks: [[left's scores, 0], [cross, right's scores]].
    prev = scores.reshape(rows, -1, 2, size, size)
    top = jnp.concatenate([prev[:, :, 0], jnp.zeros_like(cross)], axis=-1)
    bottom = jnp.concatenate([cross, prev[:, :, 1]], axis=-1)
    scores = jnp.concatenate([top, bottom], axis=-2)
    # Segment sums for segments of 2h: add the other half's total, never subtract.
    left_total = into_h[:, :, 0, -1:]
    right_total = into_h[:, :, 1, -1:]
    join = lambda left, right: jnp.stack([left, right], axis=2).reshape(rows, chunk, dim)
    into = join(into_h[:, :, 0], into_h[:, :, 1] + left_total)
    after = join(after_h[:, :, 0] + right_total, after_h[:, :, 1])
    size *= 2
  return scores.reshape(rows, chunk, chunk), into, after


def chunked(q, k, v, g, s0, *, chunk_size: int, segment_size: int | None = None):
  """Chunked form (see module docstring). Internal contract as in `scan.py`.

  With `segment_size` L_seg and T > L_seg, the first floor(T / L_seg) L_seg tokens run as a
  `jax.lax.scan` over segments of L_seg tokens (L_seg rounded down to a multiple of the chunk, at
  least one chunk), each a chunked pass continuing the state the previous one returned, and the
  rest as one more pass. The function is the same (the chunk boundaries are the same when L_seg
  is a multiple of C); the segment body is `jax.checkpoint`ed, so the backward pass recomputes
  one segment's intra-chunk arrays at a time instead of storing them for the whole sequence:
  XLA's temporary memory of forward+backward becomes O(T / L_seg) states plus one segment's arrays
  instead of O(T C). On CPU it is also faster at long T (one segment's arrays stay in the caches;
  `planner.ENGINE_SEGMENT` has the measurements).
  """
  chunk = effective_chunk_size(chunk_size, g.shape[-1] > 1)
  if segment_size is None or q.shape[1] <= segment_size:
    return _chunked_pass(q, k, v, g, s0, chunk_size=chunk)
  segment = max(segment_size // chunk, 1) * chunk
  batch, time = q.shape[:2]
  count = time // segment
  whole = count * segment

  def split(x):  # [B, count L_seg, ...] -> [count, B, L_seg, ...]
    x = x[:, :whole].reshape((batch, count, segment) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  @jax.checkpoint
  def body(state, inputs):
    o, state = _chunked_pass(*inputs, state, chunk_size=chunk)
    return state, o

  state, o = jax.lax.scan(body, s0, [split(x) for x in (q, k, v, g)])
  o = jnp.moveaxis(o, 0, 1).reshape((batch, whole) + o.shape[3:])
  if whole == time:
    return o, state
  o_rest, state = _chunked_pass(*(x[:, whole:] for x in (q, k, v, g)), state, chunk_size=chunk)
  return jnp.concatenate([o, o_rest], axis=1), state


def _chunked_pass(q, k, v, g, s0, *, chunk_size: int):
  """One chunked pass over the whole of its inputs (`chunked` without segments), differentiated
  through `_gauge_jvp`."""
  return _gauged_pass(q, k, v, g, s0, chunk_size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _gauged_pass(q, k, v, g, s0, chunk_size):
  return _plain_pass(q, k, v, g, s0, chunk_size=chunk_size)


def _gauge_jvp(chunk_size, primals, tangents):
  """The pass's JVP with the log decays' tangent moved onto the queries and keys (a gauge).

  Shifting g_t (one head, or one key channel) by e multiplies exactly the products that cross t,
  decay(j -> i) for j < t <= i, by e^e, and so does scaling the queries at i >= t by e^e, the
  keys at j >= t by e^-e and the final state by e^e (every term of the state before t crosses
  t; the rest keeps the keys' e^-e): the function changes the same way. So with G the tangent of
  the prefix sum of g (inclusive), the tangent is that of the pass at fixed g along

      dq + q G,   dk - k G,   dv,   ds0,     plus G_T S_T on the final state.

  Reverse mode transposes this into the usual identity dg_t = sum_{i >= t} (q_i . dq_i - k_i .
  dk_i) + <dS_T, S_T> (as the chunked GLA kernels of flash-linear-attention compute it): two
  row dots and a reversed cumulative sum per token, instead of differentiating the decay
  matrices, the exponentials of the chunk offsets and the scan's decays. Exact in exact
  arithmetic (at g_t = -inf too, where both sides are 0; in float32 the identity's sum leaves a
  rounding residue there, as it does everywhere). That sum runs over the whole pass, so its
  float32 error grows with the pass's length where plain autodiff's does not (the tests bound it
  against float64 at T = 4096; on CPU the planner runs 8192 tokens and more in segments of 1024,
  so a pass is shorter than 8192).
  """
  q, k, v, g, s0 = primals
  dq, dk, dv, dg, ds0 = tangents
  zero = lambda t: isinstance(t, SymbolicZero)
  if not zero(dg):
    gauge = prefix_sum(dg, axis=1)                          # [B, T, H, D], D = 1 or K
    if g.shape[-1] == 1:
      # One factor per row as an einsum: its transpose (the gauge's cotangent, a row dot) is a
      # dot_general, not XLA:CPU's slow reduce-of-multiply (see `rowwise`).
      by_gauge = lambda x: jnp.einsum("...k,...->...k", x, gauge[..., 0],
                                      precision=jax.lax.Precision.HIGHEST)
    else:
      by_gauge = lambda x: x * gauge
    dq = by_gauge(q) if zero(dq) else dq + by_gauge(q)
    dk = -by_gauge(k) if zero(dk) else dk - by_gauge(k)
  at_fixed_g = lambda q, k, v, s0: _plain_pass(q, k, v, g, s0, chunk_size=chunk_size)
  out, (do, dfinal) = jvp_of_nonzero(at_fixed_g, (q, k, v, s0), (dq, dk, dv, ds0))
  if not zero(dg):
    dfinal = dfinal + gauge[:, -1, :, :, None] * out[1]      # G_T [B, H, D, 1] times S_T
  return out, (do, dfinal)


_gauged_pass.defjvp(lambda *args: _gauge_jvp(*args), symbolic_zeros=True)


def jvp_of_nonzero(fn, primals, tangents):
  """`jax.jvp(fn, primals, tangents)` where some tangents may be `SymbolicZero`s (a custom_jvp
  rule with symbolic_zeros=True): those inputs are held fixed rather than given zero tangents,
  so no tangent work is traced for them. Returns (fn(*primals), its tangent)."""
  active = [i for i, t in enumerate(tangents) if not isinstance(t, SymbolicZero)]

  def of_active(*values):
    full = list(primals)
    for i, value in zip(active, values):
      full[i] = value
    return fn(*full)

  return jax.jvp(of_active, tuple(primals[i] for i in active),
                 tuple(tangents[i] for i in active))


def _plain_pass(q, k, v, g, s0, *, chunk_size: int):
  """One chunked pass, differentiated by plain autodiff (`_chunked_pass` with its rule)."""
  batch, time, heads, _ = q.shape
  per_channel = g.shape[-1] > 1
  chunk = effective_chunk_size(chunk_size, per_channel)
  n_chunks = -(-time // chunk)
  pad = n_chunks * chunk - time
  # Zero keys/values and zero log decay (a = 1) on padding leave outputs and the state unchanged.
  q, k, v, g = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v, g))

  def blocks(x):  # [B, T, H, .] -> [B, H, N, C, .]
    x = x.reshape(batch, n_chunks, chunk, heads, x.shape[-1])
    return jnp.transpose(x, (0, 3, 1, 2, 4))

  q, k, v, g = blocks(q), blocks(k), blocks(v), blocks(g)

  # Intra-chunk scores, and the decays from the chunk start (into) and to the chunk end (after).
  if per_channel:
    flat = lambda x: x.reshape((-1,) + x.shape[-2:])
    scores, into, after = _per_channel_scores(flat(q), flat(k), flat(g))
    scores, into, after = (x.reshape(g.shape[:-1] + x.shape[-1:]) for x in (scores, into, after))
  else:
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * head_decay_weights(g[..., 0])
    into = prefix_sum(g, axis=-2)
    after = reverse_exclusive_cumsum(g, axis=-2)

  # Inter-chunk part: chunk summaries, then every chunk's state from them.
  if per_channel:
    scaled = lambda x, log_scale: x * jnp.exp(log_scale)
  else:   # one factor per row (rowwise.scale_rows: its gradient is a dot, not a slow reduction)
    scaled = lambda x, log_scale: scale_rows(x, jnp.exp(log_scale[..., 0]))
  summaries = jnp.einsum("bhnck,bhncv->bhnkv", scaled(k, after), v)         # [B, H, N, K, V]
  if per_channel or n_chunks > MAX_CHUNK_MATRIX:
    # A parallel prefix over chunks (log-depth).
    chunk_decay = jnp.exp(jnp.sum(g, axis=-2))[..., None]                   # [B, H, N, D, 1]
    cum_decay, cum_update = jax.lax.associative_scan(
        combine_decayed_states, (chunk_decay, summaries), axis=2)
    if not per_channel:
      cum_decay = cum_decay[..., 0, 0]                                      # [B, H, N]
  else:
    # One decay per head: the states are one matmul of the chunks' causal decay matrix (the
    # intra-chunk one, `head_decay_weights`, over chunk totals) with the summaries.
    totals = jnp.sum(g[..., 0], axis=-1)                                    # [B, H, N]
    cum_update = jnp.einsum("bhnm,bhmkv->bhnkv", head_decay_weights(totals), summaries,
                            precision=jax.lax.Precision.HIGHEST)
    cum_decay = jnp.exp(prefix_sum(totals, axis=-1))                        # [B, H, N]
  if per_channel:
    states = cum_decay * s0[:, :, None] + cum_update                        # after each chunk
  else:   # as an einsum: its gradient for s0 is a dot, not a slow multiply-reduce (`rowwise`)
    states = jnp.einsum("bhn,bhkv->bhnkv", cum_decay, s0,
                        precision=jax.lax.Precision.HIGHEST) + cum_update
  entering = jnp.concatenate([s0[:, :, None], states[:, :, :-1]], axis=2)
  o = jnp.einsum("bhnck,bhnkv->bhncv", scaled(q, into), entering)
  o = o + jnp.einsum("bhnij,bhnjv->bhniv", scores, v)

  o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(batch, n_chunks * chunk, heads, -1)
  return o[:, :time], states[:, :, -1]
