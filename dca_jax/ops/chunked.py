"""Chunked form of gated linear attention: the fast path for training and prefill.

The sequence is cut into chunks of C tokens (the hierarchy tokens -> chunk summaries -> prefix
over chunks). With g the log decays and, inside chunk n,

    into_i  = g_{start..i}          (decay from the chunk start to token i, inclusive)
    after_j = g_{j+1..end}          (decay from token j to the chunk end)

the state entering chunk n is S_{n-1}, and

    o_i     = (q_i * exp(into_i))^T S_{n-1}  +  sum_{j <= i in chunk} A_ij v_j      (inter + intra)
    S_n     = exp(g_{chunk}) * S_{n-1} + sum_j (k_j * exp(after_j)) v_j^T          (chunk summary)

The chunk summaries (exp(g_chunk), U_n) are combined with `jax.lax.associative_scan` using
`combine_decayed_states`, so the state of every chunk is known after O(log(T/C)) steps.

Intra-chunk scores A_ij = sum_c q_ic k_jc exp(g_{j+1..i, c}) need care with per-channel decays:
the usual factorisation (q_i exp(into_i)) . (k_j exp(-into_j)) overflows once the decay inside a
chunk exceeds ~88 nats (float32), which data-dependent decays easily reach. Here every chunk is
cut again into sub-chunks of c <= 8 tokens:

* between sub-chunks J < I the decay splits at the two sub-chunk boundaries into three factors,
  each a direct sum of non-positive terms, so every exponential is <= 1 and nothing overflows:
      g_{j+1..i} = g_{j+1..end(J)}  +  g_{start(J+1)..end(I-1)}  +  g_{start(I)..i};
  the middle factor depends only on the pair (I, J) and is applied to the queries, after which
  one batched matmul gives every block;
* within a sub-chunk the scores are computed exactly in log space (`decayed_scores`), which
  costs O(c K) per token instead of a matmul, so c is kept small.

With one decay per head (D = 1) the decay factors out of the channel sum and the whole [C, C]
block is a matmul times the exact decay matrix, so no sub-chunks are needed.

References:
  Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
  sec. 4 (chunkwise form, secondary chunking); Dao & Gu 2024, "Transformers are SSMs" (Mamba-2),
  sec. 6 (chunked "segsum" algorithm for scalar decays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.ops.quadratic import decay_matrix, decayed_scores, prefix_sum, reverse_exclusive_cumsum
from dca_jax.ops.scan import combine_decayed_states

# Sub-chunk length for per-channel decays: the in-log-space diagonal blocks cost O(c K) per token
# and XLA's CPU backend handles these broadcast-reduce blocks poorly, so c stays small (8 was faster
# than 16 in a one-off check at T=8192, H=4, K=64 during development; not a committed benchmark).
SUB_CHUNK = 8


def effective_chunk_size(chunk_size: int) -> int:
  """The chunk length actually used: chunks longer than a sub-chunk hold whole sub-chunks.

  The result is mathematically identical for every chunk size; only speed and memory differ.
  """
  if chunk_size <= SUB_CHUNK:
    return chunk_size
  return -(-chunk_size // SUB_CHUNK) * SUB_CHUNK


def _split(x, size, axis):
  """Reshapes `axis` of length n * size into (n, size)."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return x.reshape(shape)


def _per_channel_scores(q, k, g):
  """Intra-chunk scores [..., C, C] for per-channel decays, via sub-chunks (see module doc)."""
  chunk = q.shape[-2]
  sub = min(SUB_CHUNK, chunk)
  n_sub = chunk // sub
  qs, ks, gs = (_split(x, sub, x.ndim - 2) for x in (q, k, g))   # [..., I, c, K]
  diagonal = decayed_scores(qs, ks, gs)                             # [..., I, c, c]
  if n_sub == 1:
    return diagonal[..., 0, :, :]
  into = prefix_sum(gs, axis=-2)                                    # start(I)..i
  after = reverse_exclusive_cumsum(gs, axis=-2)                     # j+1..end(J)
  totals = jnp.sum(gs, axis=-2)                                     # [..., I, K]
  # between[I, J] = sum of the totals of sub-chunks J+1 .. I-1 (direct sums, for J < I).
  spans = decay_matrix(totals)                                      # [..., I, J, K]: J+1..I
  between = jnp.concatenate([jnp.zeros_like(spans[..., :1, :, :]), spans[..., :-1, :, :]], axis=-3)
  earlier = jnp.arange(n_sub)[:, None] > jnp.arange(n_sub)[None, :]
  between = jnp.where(earlier[:, :, None], between, -jnp.inf)       # exp -> 0 unless J < I
  # For each key sub-chunk J, every query of the chunk scaled to J's end: [..., J, I, i, K].
  pair_decay = jnp.exp(jnp.swapaxes(between, -3, -2))               # [..., J, I, K]
  q_scaled = (qs * jnp.exp(into))[..., None, :, :, :] * pair_decay[..., :, :, None, :]
  q_scaled = q_scaled.reshape(q_scaled.shape[:-3] + (chunk, q.shape[-1]))   # [..., J, C, K]
  off = jnp.einsum("...Jqk,...Jjk->...qJj", q_scaled, ks * jnp.exp(after))    # [..., C, J, c]
  off = off.reshape(off.shape[:-2] + (chunk,))
  same = (jnp.arange(chunk)[:, None] // sub) == (jnp.arange(chunk)[None, :] // sub)
  # Place the diagonal blocks: [..., I, i, j] -> [..., C, C] with zeros off the block diagonal.
  diag_full = jnp.einsum("...Iij,IJ->...IiJj", diagonal, jnp.eye(n_sub, dtype=q.dtype))
  diag_full = diag_full.reshape(diag_full.shape[:-4] + (chunk, chunk))
  return jnp.where(same, diag_full, off)


def chunked(q, k, v, g, s0, *, chunk_size: int):
  """Chunked form (see module docstring). Internal contract as in `scan.py`."""
  batch, time, heads, _ = q.shape
  chunk = effective_chunk_size(chunk_size)
  n_chunks = -(-time // chunk)
  pad = n_chunks * chunk - time
  # Zero keys/values and zero log decay (a = 1) on padding leave outputs and the state unchanged.
  q, k, v, g = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v, g))

  def blocks(x):  # [B, T, H, .] -> [B, H, N, C, .]
    x = x.reshape(batch, n_chunks, chunk, heads, x.shape[-1])
    return jnp.transpose(x, (0, 3, 1, 2, 4))

  q, k, v, g = blocks(q), blocks(k), blocks(v), blocks(g)

  # Inter-chunk part: chunk summaries, then a parallel prefix over chunks.
  into = prefix_sum(g, axis=-2)
  after = reverse_exclusive_cumsum(g, axis=-2)
  chunk_decay = jnp.exp(jnp.sum(g, axis=-2))[..., None]                     # [B, H, N, D, 1]
  summaries = jnp.einsum("bhnck,bhncv->bhnkv", k * jnp.exp(after), v)       # [B, H, N, K, V]
  cum_decay, cum_update = jax.lax.associative_scan(
      combine_decayed_states, (chunk_decay, summaries), axis=2)
  states = cum_decay * s0[:, :, None] + cum_update                          # after each chunk
  entering = jnp.concatenate([s0[:, :, None], states[:, :, :-1]], axis=2)
  o = jnp.einsum("bhnck,bhnkv->bhncv", q * jnp.exp(into), entering)

  # Intra-chunk part.
  if g.shape[-1] == 1:
    scores = decayed_scores(q, k, g)
  else:
    scores = _per_channel_scores(q, k, g)
  o = o + jnp.einsum("bhnij,bhnjv->bhniv", scores, v)

  o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(batch, n_chunks * chunk, heads, -1)
  return o[:, :time], states[:, :, -1]
