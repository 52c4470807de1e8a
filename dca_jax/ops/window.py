"""Exact causal softmax attention over a sliding window: DCA's working memory.

Each query sees the last W keys of its own document exactly, at a cost linear in T. The window
is computed in blocks of P >= W tokens: a query block needs only its own key block and the one
before it, so the scores never exceed [P, 2P] per block and no T x T matrix is ever formed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks

# Smallest block, in tokens. Measured on this project's 2-core CPU (T=8192, B=1, H=4, K=V=64,
# W=64, float32, jit, forward): P=64 3.6 ms, P=128 4.6 ms, P=256 7.0 ms; forward + backward
# 16 / 19 / 26 ms. Blocks past 2W only add masked-out work, and tiny blocks (W < 32) pay more in
# per-block overhead than they save in masked work, hence max(W, 32).
_MIN_BLOCK = 32


def _block_size(window: int, time: int) -> int:
  """The block size P: at least the window (so two blocks cover it), never past T."""
  return min(max(window, _MIN_BLOCK), time)


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float | jax.Array | None = None,
    reset: jax.Array | None = None,
) -> jax.Array:
  r"""Causal softmax attention restricted to the last `window` tokens of each document.

  For every batch element, head and query position t, with w = `window` and doc(t) the
  document of position t (doc = cumulative sum of `reset` along T):

      J_t = {j : t - w < j <= t, doc(j) = doc(t)}
      s_tj = scale * q_t . k_j
      o_t = sum_{j in J_t} softmax_j(s_tj) v_j
          = sum_{j in J_t} exp(s_tj - m_t) v_j / sum_{j in J_t} exp(s_tj - m_t),
      m_t = max_{j in J_t} s_tj.

  t itself is always in J_t, so every query has at least one key. When w >= T and there is no
  reset this is plain causal softmax attention.

  Shapes (B batch, T time, H heads, K key dim, V value dim, W window, P block):
  q, k: [B, T, H, K]; v: [B, T, H, V]; reset: [B, T] bool; output [B, T, H, V].

  Computation: T is padded to N blocks of P = min(max(W, 32), T) tokens; query block n scores
  against key blocks n-1 and n ([P, 2P] per block and head) and a position and document mask
  keeps J_t. Time O(B H T P (K + V)) and memory O(B H T P), linear in T. The scores, softmax
  and accumulation run in float32 (float64 for float64 inputs) whatever the input dtype; the
  result is cast back to q's dtype. Pure, and compatible with jit, vmap and grad.

  Args:
    q: queries, [B, T, H, K], floating.
    k: keys, [B, T, H, K], floating.
    v: values, [B, T, H, V], floating.
    window: W >= 1, how many tokens each query sees, itself included.
    scale: multiplies the scores; defaults to 1/sqrt(K).
    reset: optional bool [B, T]; reset[b, t] true starts a new document at t, and no query
      attends to a key of another document.

  Returns:
    [B, T, H, V] in q's dtype.

  Raises:
    TypeError: an argument is not an array, q/k/v are not floating or `reset` is not bool.
    ValueError: wrong ranks, mismatched B, T, H or K between q, k and v, `window` not an
      integer >= 1, or `reset` not of shape [B, T].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dca_jax.ops.window import sliding_window_attention
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 4, 8))
    >>> sliding_window_attention(q, k, v, window=16).shape
    (2, 100, 4, 8)

  References:
    Beltagy et al. 2020, "Longformer: The Long-Document Transformer", sec. 3.1 (sliding
    window attention); Arora et al. 2024, "Simple linear attention language models balance
    the recall-throughput tradeoff" (Based), sec. 3.2 (sliding window with linear attention).
  """
  _checks.check_array("q", q, 4)
  _checks.check_array("k", k, 4)
  _checks.check_array("v", v, 4)
  batch, time, heads, key_dim = q.shape
  for name, x in (("k", k), ("v", v)):
    _checks.check_dim(name, x, 0, batch, "batch size B (from q)")
    _checks.check_dim(name, x, 1, time, "length T (from q)")
    _checks.check_dim(name, x, 2, heads, "head count H (from q)")
  _checks.check_dim("k", k, 3, key_dim, "key dim K (from q)")
  _checks.check_positive_int("window", window)
  _checks.check_reset(reset, batch, time)
  if scale is None:
    scale = 1.0 / math.sqrt(key_dim)
  # Keys further back than T never exist, so a huge window costs no more than W = T.
  window = min(int(window), time)
  return _blocked(q, k, v, window, scale, reset, _block_size(window, time))


def _blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window: int,
    scale: float | jax.Array,
    reset: jax.Array | None,
    block: int,
) -> jax.Array:
  """The blocked computation for any block size P >= W; inputs already checked."""
  batch, time, heads, _ = q.shape
  out_dtype = q.dtype
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
  n_blocks = -(-time // block)
  pad = n_blocks * block - time

  def to_blocks(x):
    # [B, T, H, D] -> [B, H, N, P, D]: batch dims lead and the contraction dim is last, the
    # layout XLA's CPU dot_general runs without copies.
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.reshape(batch, n_blocks, block, heads, -1).transpose(0, 3, 1, 2, 4)

  def with_previous(x):
    # [..., N, P, D] -> [..., N, 2P, D]: block n - 1 then block n (zeros before block 0).
    if n_blocks == 1:
      return x
    prev = jnp.pad(x[..., :-1, :, :], [(0, 0)] * (x.ndim - 3) + [(1, 0), (0, 0), (0, 0)])
    return jnp.concatenate([prev, x], axis=-2)

  qb = to_blocks(q) * jnp.asarray(scale, dtype)
  kb = with_previous(to_blocks(k))
  vb = with_previous(to_blocks(v))
  span = kb.shape[-2]  # 2P, or P when there is a single block

  # Global positions: query i of block n is t = nP + i, key s of the pair is j = nP + s - (span - P).
  n = jnp.arange(n_blocks)[:, None, None]
  i = jnp.arange(block)[None, :, None]
  s = jnp.arange(span)[None, None, :]
  rel = i - (s - (span - block))  # t - j
  mask = (rel >= 0) & (rel < window) & (n * block + s - (span - block) >= 0)  # [N, P, span]
  mask = mask[None, None]
  if reset is not None:
    # Padding after T continues the last document; such keys are already masked by causality.
    doc = jnp.pad(jnp.cumsum(reset.astype(jnp.int32), axis=1), ((0, 0), (0, pad)), mode="edge")
    doc = doc.reshape(batch, 1, n_blocks, block, 1)
    mask = mask & (doc == jnp.swapaxes(with_previous(doc), -1, -2))

  scores = jnp.einsum("bhnpk,bhnsk->bhnps", qb, kb)
  scores = jnp.where(mask, scores, -jnp.inf)
  # The query itself is always unmasked, so the max is finite and the sum is >= 1.
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  p = jnp.exp(scores - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhnps,bhnsv->bhnpv", p, vb) / denom
  out = out.transpose(0, 2, 3, 1, 4).reshape(batch, n_blocks * block, heads, -1)
  return out[:, :time].astype(out_dtype)
