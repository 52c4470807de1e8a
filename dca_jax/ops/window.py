"""Exact causal softmax attention over a sliding window: DCA's working memory.

Each query sees the last W keys of its own document exactly, at a cost linear in T. The window
is computed in blocks of P >= W tokens: a query block needs only its own key block and the one
before it, so there are two [P, P] score blocks per query block and no T x T matrix is ever
formed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax.ops import _checks
from dca_jax.ops.rotary import rotate_pairs, static_tables
from dca_jax.ops.rowwise import scale_rows
from dca_jax.ops import segments
from dca_jax.ops.segments import document_ids


def _block_size(window: int) -> int:
  """The block size P = W: the smallest with which two blocks cover every window.

  Larger blocks only add scores that the mask throws away, and small windows gain nothing from
  a floor on P.
  """
  return window


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    scale: float | jax.Array | None = None,
    reset: jax.Array | None = None,
    confine_nonfinite: bool = True,
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

  Computation: T is padded to N blocks of P = min(W, T) tokens; query block n scores against
  key blocks n - 1 and n (two [P, P] blocks per block and head) and a position and document
  mask keeps J_t. Time O(B H T P (K + V)) and memory O(B H T P), linear in T. The scores, softmax
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
    confine_nonfinite: a NaN or infinity in q, k or v makes NaN exactly the outputs whose
      window and document hold it, and no other. False skips that work (1-2 % of the
      sliding-window layer's training step at T = 1024 and 8192 on the 2-core CPU,
      docs/confine_check.json, `python -m experiments.confine_check`) for callers whose inputs
      are finite by construction, such as the layers, which confine a non-finite input x
      themselves; a non-finite q, k or v then gives NaN outputs beyond the ones that see it.

  Returns:
    [B, T, H, V] in q's dtype.

  Raises:
    TypeError: an argument is not an array, q/k/v are not floating, `reset` is not bool or
      `confine_nonfinite` is not a Python bool.
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
    window attention). Arora et al. 2024, "Simple linear attention language models balance
    the recall-throughput tradeoff" (Based: a sliding window beside linear attention).
    docs/theory.md (the working memory of DCA).
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
  guard = _checks.check_flag("confine_nonfinite", confine_nonfinite)
  if scale is None:
    scale = 1.0 / math.sqrt(key_dim)
  if time == 0:
    return jnp.zeros((batch, 0, heads, v.shape[-1]), q.dtype)
  if isinstance(scale, (int, float)):
    return _compiled_window(q, k, v, reset, window=window, scale=float(scale), guard=guard)
  return _window(q, k, v, reset, window=window, scale=scale, guard=guard)


def _window(q, k, v, reset, *, window: int, scale, guard: bool = True,
            rotary_base: float | None = None):
  doc = None if reset is None else document_ids(reset)
  num, den, _ = window_softmax_parts(q, k, v, window=window, scale=scale, doc=doc, guard=guard,
                                     rotary_base=rotary_base)
  # 1 / Z through rowwise.scale_rows: its gradient is then an einsum, not a reduce-of-multiply
  # (see rowwise; the layer's wall time did not change measurably). Z >= 1 here.
  return scale_rows(num, 1.0 / den).astype(q.dtype)


def rotary_window_attention(q, k, v, *, window: int, rotary_base: float,
                            reset: jax.Array | None = None,
                            confine_nonfinite: bool = False) -> jax.Array:
  """`sliding_window_attention(rot(q), rot(k), v)` with rotary embeddings at absolute positions
  0 .. T - 1 (`rotary.apply_rotary`), for the layers (internal: no checks; the layers confine a
  non-finite x themselves, so the op's own confinement is off unless `confine_nonfinite`).

  Scores depend on positions only through their differences, so q and k are rotated inside the
  blocks by in-block offsets (`window_softmax_parts`' rotary_base) from constant tables: equal
  to rotating by absolute positions up to float32 rounding, while cos and sin of a [T, K/2]
  angle array in the compiled program were fused by XLA:CPU into each consumer and recomputed
  for every element of q and k (`python -m experiments.performance` measures the layer)."""
  return _window(q, k, v, reset, window=window, scale=1.0 / math.sqrt(q.shape[-1]),
                 guard=confine_nonfinite, rotary_base=rotary_base)


# One compiled program per shape when called eagerly (a Python scale is static; an array scale
# takes the uncompiled path and is traced by the caller's jit, if any).
_compiled_window = jax.jit(_window, static_argnames=("window", "scale", "guard"))


def window_softmax_parts(q, k, v, *, window: int, scale, doc=None, rotary_base: float | None = None,
                         block_size: int | None = None, guard: bool = True):
  """The unnormalised pieces of window softmax, for callers that add other terms to it (DCA).

  Returns N_t = sum_{j in J_t} exp(s_tj - m_t) v_j, Z_t = sum_{j in J_t} exp(s_tj - m_t) and
  m_t = max_{j in J_t} s_tj, so that softmax attention is N_t / Z_t and other positive terms can
  share the normaliser after rescaling (see `dca_memory.combine_memories`). Inputs are not checked
  (internal: the public wrappers check them).

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V].
    window: W >= 1.
    scale: score scale.
    doc: optional int [B, T] document ids; a query sees only keys with its own id. Any ids work
      (negative ones mark slots that only match each other), as long as each query's own id
      makes it see itself.
    rotary_base: when given, rotary embeddings by relative offsets (query i of a block is rotated
      by i, or by i + P against the previous block; key s by s): angles stay below 2 P whatever
      the absolute position, so no precision is lost on long sequences.
    block_size: P >= W (default W); larger blocks only add scores the mask drops (for tests).
    guard: confine non-finite inputs (below). False skips that work, for callers whose inputs
      are finite by construction (the layers, which confine a non-finite x themselves); a
      non-finite input then makes NaN outputs it may reach beyond the queries that see it.

  Returns:
    (N [B, T, H, V], Z [B, T, H], m [B, T, H]), float32 (float64 for float64 inputs). With
    `guard`, N is NaN exactly where a query sees a non-finite key or value (or its own query is
    not finite); non-finite inputs outside a query's window or document do not change it.
  """
  batch, time, heads, _ = q.shape
  # Keys further back than T never exist, so a huge window costs no more than W = T.
  block = block_size or _block_size(min(int(window), time))
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
  n_blocks = -(-time // block)
  pad = n_blocks * block - time

  def padded(x):
    return jnp.pad(x.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))

  def to_blocks(x):
    # [B, T, H, D] -> [B, H, N, P, D]: batch dims lead and the contraction dim is last, the
    # layout XLA's CPU dot_general runs without copies.
    return x.reshape(batch, n_blocks, block, heads, -1).transpose(0, 3, 1, 2, 4)

  def previous(x):
    # Block n - 1 aligned with block n along N; block 0 gets zeros, which the mask drops.
    return jnp.pad(x[:, :, :-1], [(0, 0), (0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 3))

  # Non-finite inputs are zeroed (a select) and the outputs that can see them set to NaN at the
  # end, so nothing outside a query's window and document can change it (0 x NaN is NaN).
  poisoned = None
  if guard:
    bad_q = segments.nonfinite(q)                                        # [B, T, H]
    bad_kv = segments.nonfinite(k) | segments.nonfinite(v)
    q, = segments.zero_where(bad_q, q)
    k, v = segments.zero_where(bad_kv, k, v)
    poisoned = segments.sees_nonfinite(bad_kv, doc, window=window) | bad_q

  q_pad, k_pad = padded(q) * jnp.asarray(scale, dtype), padded(k)
  q_prev_pad = q_pad
  if rotary_base is not None:
    cos, sin = _block_rotary_tables(block, q.shape[-1], rotary_base)     # [2P, 1, K/2]

    def rotate(x, offset):  # position i of every block rotated by i + offset
      xb = x.reshape(batch, n_blocks, block, heads, -1)
      y = rotate_pairs(xb, cos[offset:offset + block], sin[offset:offset + block])
      return y.astype(dtype).reshape(x.shape)

    k_pad = rotate(k_pad, 0)
    q_prev_pad = rotate(q_pad, block)
    q_pad = rotate(q_pad, 0)
  qb, kb, vb = to_blocks(q_pad), to_blocks(k_pad), to_blocks(padded(v))

  # Query i and key s of one block are at t - j = i - s; against the previous block at i - s + P.
  i = jnp.arange(block)[:, None]
  s = jnp.arange(block)[None, :]
  mask_cur = (s <= i) & (i - s < window)  # [P, P]
  if doc is not None:
    # Padding after T continues the last document; those keys are already masked by causality.
    doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge").reshape(batch, 1, n_blocks, block, 1)
    mask_cur = mask_cur & (doc == jnp.swapaxes(doc, -1, -2))  # [B, 1, N, P, P]
  # Two [P, P] score blocks rather than one [P, 2P] against concatenated keys: no copy of k and
  # v, and it measured a little faster on CPU.
  scores = [jnp.where(mask_cur, jnp.einsum("bhnpk,bhnsk->bhnps", qb, kb), -jnp.inf)]
  values = [vb]
  if n_blocks > 1:
    mask_prev = (i - s + block < window) & (jnp.arange(n_blocks) > 0)[:, None, None]  # [N, P, P]
    if doc is not None:
      mask_prev = mask_prev & (doc == jnp.swapaxes(previous(doc), -1, -2))
    scores_prev = jnp.einsum("bhnpk,bhnsk->bhnps", to_blocks(q_prev_pad), previous(kb))
    scores.append(jnp.where(mask_prev, scores_prev, -jnp.inf))
    values.append(previous(vb))

  # The query itself is never masked, so the max is finite and the normaliser is >= 1. The max
  # only stabilises the exponentials; the result does not depend on it, hence no gradient.
  m = functools.reduce(jnp.maximum, [x.max(-1, keepdims=True) for x in scores])
  m = jax.lax.stop_gradient(m)
  probs = [jnp.exp(x - m) for x in scores]
  den = sum(p.sum(-1) for p in probs)
  num = sum(jnp.einsum("bhnps,bhnsv->bhnpv", p, x) for p, x in zip(probs, values))

  def to_time(x):  # [B, H, N, P, ...] -> [B, T, H, ...]
    x = jnp.moveaxis(x, 1, 3).reshape((batch, n_blocks * block, heads) + x.shape[4:])
    return x[:, :time]

  num = to_time(num)
  if poisoned is not None:
    num = jnp.where(poisoned[..., None], jnp.nan, num)
  return num, to_time(den), to_time(m[..., 0])


@functools.lru_cache(maxsize=64)
def _block_rotary_tables(block: int, key_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [2P, 1, K/2] of the rotary angles at in-block offsets 0 .. 2P - 1.

  Offsets repeat in every block, so the table is a constant of the program: computed here once
  (the float32 angle i * f_i as `apply_rotary` forms it, its cos and sin in float64, rounded once)
  instead of cos and sin of a [T, K/2] angle array in the compiled program, which XLA:CPU fused
  into every consumer and recomputed per element (`python -m experiments.performance` measures
  the layers that use this)."""
  return static_tables(np.arange(2 * block, dtype=np.int32), key_dim, base)


def window_step_parts(q, keys, values, seen, new=None):
  """The window's softmax parts for one query over a decoding state's ring buffer.

  Scores and read-out are two batched matrix-vector products over the buffer's own heads-first
  layout [B, H, slots, .], whose keys are already rotated at their positions (`DCAState`); the
  query comes rotated at its own, so no per-slot rotation is computed.

  Args:
    q: [B, H, K] the query, rotated at its position (float32).
    keys: [B, H, slots, K] float32, the buffered keys (rotated at theirs), in any slot order.
    values: [B, H, slots, V] float32. A slot that is not seen holds a finite value (zero, or a token
      of the current document that has left the window): its weight is exactly 0.
    seen: bool [B, slots], the slots the query attends to (its own slot always is, unless `new`).
    new: None, or the query's own token (k [B, H, K] rotated at its position, v [B, H, V]),
      always seen, when the buffers do not hold it yet (`dca_memory.StepWrite`).

  Returns:
    (N [B, H, V], Z [B, H], m [B, H]) float32 as `window_softmax_parts` gives for that query.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  q = q.astype(jnp.float32)
  scores = jnp.einsum("bhk,bhsk->bhs", q, keys) * scale
  # A non-finite score of an unseen slot is selected away here.
  scores = jnp.where(seen[:, None, :], scores, -jnp.inf)
  top = jnp.max(scores, axis=-1)                                    # [B, H]
  if new is not None:
    own = jnp.einsum("bhk,bhk->bh", q, new[0]) * scale
    top = jnp.maximum(top, own)
  top = jax.lax.stop_gradient(top)   # finite: the query's own token is always seen
  probs = jnp.exp(scores - top[..., None])
  num = jnp.einsum("bhs,bhsv->bhv", probs, values)                                  # [B, H, V]
  den = jnp.sum(probs, axis=-1)
  if new is not None:
    weight = jnp.exp(own - top)
    num, den = num + weight[..., None] * new[1], den + weight
  return num, den, top
