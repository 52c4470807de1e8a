"""Quadratic (masked T x T) form of gated linear attention, and the exact decay matrix.

Unrolling the recurrence S_t = diag(a_t) S_{t-1} + k_t v_t^T (a_t = exp(g_t)) gives

    o_i = sum_{j <= i} ( sum_c q_ic k_jc exp(D_ijc) ) v_j  +  (q_i * exp(D_i0))^T S_0,
    D_ijc = g_{j+1,c} + ... + g_{i,c}     (the log decay between key j and query i).

`decay_matrix` computes D by summing the log decays directly (a masked cumulative sum), never as
a difference of two prefix sums: a difference of prefix sums cancels catastrophically once a very
negative or -inf log decay enters the prefix (-inf - -inf is NaN; -1e4 + 0.01 - -1e4 loses the
0.01), while a direct sum of non-positive numbers is exact in the limits that matter (-inf stays
-inf, exp of it is 0). The chunked form uses `decayed_scores` inside its chunks for per-head
decays, and the same rule (direct sums only) for per-channel ones (chunked.py).

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
    weights = jnp.exp(decays[..., 0])
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * weights
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
