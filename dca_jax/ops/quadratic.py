"""Quadratic (masked T x T) form of gated linear attention, and the exact decay matrix.

Unrolling the recurrence S_t = diag(a_t) S_{t-1} + k_t v_t^T (a_t = exp(g_t)) gives

    o_i = sum_{j <= i} ( sum_c q_ic k_jc exp(D_ijc) ) v_j  +  (q_i * exp(D_i0))^T S_0,
    D_ijc = g_{j+1,c} + ... + g_{i,c}     (the log decay between key j and query i).

`decay_matrix` computes D by summing the log decays directly (a masked cumulative sum), never as
a difference of two prefix sums: a difference of prefix sums cancels catastrophically once a very
negative or -inf log decay enters the prefix (-inf - -inf is NaN; -1e4 + 0.01 - -1e4 loses the
0.01), while a direct sum of non-positive numbers is exact in the limits that matter (-inf stays
-inf, exp of it is 0). For one decay per head inside a chunk, `head_decay_weights` forms the same
direct sums as one masked [L, L] x [L, L] matmul (O(L^3): for chunks, not for this form's T x T).
The chunked form uses it for per-head decays, and the same rule (direct sums only) for
per-channel ones (chunked.py).

Shapes follow the internal contract of `scan.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decay_matrix(g):
  """Log decays between every pair of positions of the second-to-last axis.

  Args:
    g: [..., L, D] log decays (<= 0, may be -inf).

  Returns:
    D: [..., L, L, D] with D[..., i, j, :] = sum_{l = j+1..i} g[..., l, :] for j <= i and 0 for
    j > i (masked by the caller).
  """
  length = g.shape[-2]
  later = jnp.arange(length)[:, None] > jnp.arange(length)[None, :]      # l > j
  terms = jnp.where(later[..., None], g[..., :, None, :], 0.0)            # [..., l, j, D]
  return prefix_sum(terms, axis=-3)


# A log decay below this is clamped to it in `head_decay_weights`: exp of any sum that holds it is
# 0 in float32 (and in float64), as exp(-inf) is, while 0 * it stays 0 inside the matmul (0 * -inf
# would be NaN). 64 of them sum to -6.4e31, far from float32's overflow.
_LOG_DECAY_FLOOR = -1e30


def head_decay_weights(g):
  """Causal decay weights exp(D_ij) of one decay per head, zero above the diagonal.

  D_ij = g_{j+1} + ... + g_i is formed as one matmul of masks with the log decays,
  sum_l [l <= i] g_l [l > j]: every term outside the range enters as an exact 0, so D is a direct
  sum of the terms in range (no difference of prefix sums, no cancellation), like
  `decay_matrix`'s cumulative sum, at a fraction of its cost on CPU (one [L, L] x [L, L] matmul
  instead of a log-depth scan over an [L, L] array), but O(L^3): meant for chunks (L = C), not
  whole sequences.
  A -inf log decay is clamped to -1e30 first (its exp, and that of any sum holding it, is 0).

  Args:
    g: [..., L] log decays (<= 0, may be -inf).

  Returns:
    [..., L, L] with exp(D_ij) for j <= i (1 on the diagonal) and 0 for j > i.
  """
  length = g.shape[-1]
  index = jnp.arange(length)
  upto = (index[None, :] <= index[:, None]).astype(g.dtype)                # [i, l]: l <= i
  later = (index[:, None] > index[None, :]).astype(g.dtype)                # [l, j]: l > j
  terms = jnp.maximum(g, _LOG_DECAY_FLOOR)[..., :, None] * later           # [..., l, j]
  # HIGHEST: on TPU (and GPU with TF32) a default-precision float32 matmul rounds its inputs to
  # fewer mantissa bits, which a sum of log decays cannot afford; on CPU it changes nothing.
  between = jnp.einsum("il,...lj->...ij", upto, terms, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(index[:, None] >= index[None, :], jnp.exp(between), 0.0)


def decayed_scores(q, k, g):
  """Causal decayed scores A_ij = sum_c q_ic k_jc exp(D_ijc) for j <= i, zero above the diagonal.

  Args:
    q: [..., L, K] queries.
    k: [..., L, K] keys.
    g: [..., L, D] log decays with D = K (per channel) or D = 1 (per head).

  Returns:
    [..., L, L] scores.
  """
  length = q.shape[-2]
  causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
  decays = decay_matrix(g)
  if g.shape[-1] == 1:
    # One decay per head: the decay factors out of the channel sum, a plain matmul remains.
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * jnp.exp(decays[..., 0])
  else:
    # Per-channel decay: the factor stays inside the channel sum (O(L^2 K) elementwise).
    scores = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * jnp.exp(decays), axis=-1)
  return jnp.where(causal, scores, 0.0)


def prefix_sum(x, axis, reverse=False):
  """Inclusive prefix sum along `axis` (suffix sum when `reverse`).

  Computed as a parallel prefix of additions (`jax.lax.associative_scan`): on CPU this is several
  times faster than `jnp.cumsum`, which XLA lowers to a quadratic-cost reduce_window, and like
  any sum of non-positive terms it keeps -inf exact (no subtraction is ever formed).
  """
  return jax.lax.associative_scan(jnp.add, x, axis=axis % x.ndim, reverse=reverse)


def reverse_exclusive_cumsum(g, axis):
  """sum over l > i of g_l along `axis`, as a direct sum (no subtraction of prefix sums)."""
  rev = prefix_sum(g, axis, reverse=True)
  shifted = jax.lax.slice_in_dim(rev, 1, rev.shape[axis], axis=axis)
  pad = [(0, 0)] * g.ndim
  pad[axis % g.ndim] = (0, 1)
  return jnp.pad(shifted, pad)


def quadratic(q, k, v, g, s0):
  """Quadratic form: O(T^2) time and memory. For tests and tiny T only."""
  qh, kh, vh, gh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, g))       # [B, H, T, .]
  scores = decayed_scores(qh, kh, gh)
  o = jnp.einsum("bhij,bhjv->bhiv", scores, vh)
  into = prefix_sum(gh, axis=-2)                                       # decay from 0 to i
  o = o + jnp.einsum("bhtk,bhkv->bhtv", qh * jnp.exp(into), s0)
  after = reverse_exclusive_cumsum(gh, axis=-2)                        # decay from j to T
  total = jnp.sum(gh, axis=-2)[..., None]                              # [B, H, D, 1]
  final = jnp.exp(total) * s0 + jnp.einsum("bhtk,bhtv->bhkv", kh * jnp.exp(after), vh)
  return jnp.swapaxes(o, 1, 2), final
