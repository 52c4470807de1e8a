"""Causal softmax attention in blocks, with memory linear in T: the fair softmax baseline.

The T x T_k score matrix is never formed. Queries are cut into blocks of P tokens and, for each,
the key blocks it can see are visited in order with an online softmax (running max m, running
normaliser l and running output, rescaled when the max grows), so only one [P, P] block of
scores exists at a time; key blocks above the diagonal are never visited (a `while_loop` whose
length depends on the query block). The backward pass (a `custom_vjp`) recomputes each score
block from the saved log-normaliser instead of storing probabilities: per key block, it visits
the query blocks that see it, accumulating dK and dV there and dQ in a [T, K] buffer. Memory is
O(T (K + V) + P^2) per batch row and head, forward and backward.

Notation: B batch, T queries, T_k keys, H heads, K key dim, V value dim, P block.

References:
  Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
  Algorithms 1 (forward) and 2 (backward); Rabe & Staats 2021, "Self-attention Does Not Need
  O(n^2) Memory".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dca_jax import flops
from dca_jax.ops import _checks, segments


def _blocks(x, n, size):
  """[B, L, H, D] (L = n * size after padding) -> [n, B, H, size, D]."""
  b, _, h, d = x.shape
  return x.reshape(b, n, size, h, d).transpose(1, 0, 3, 2, 4)


def _mask(i, j, block, q_start, keys, qdoc, kdoc):
  """[B, 1, P, P]: key j * P + s is a real key at or before query q_start + i * P + r, same doc."""
  q_pos = q_start + i * block + jnp.arange(block)
  k_pos = j * block + jnp.arange(block)
  causal = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < keys)
  same = qdoc[i][:, :, None] == kdoc[j][:, None, :]                      # [B, P, P]
  return (causal[None] & same)[:, None]


def _key_blocks_seen(i, block, q_start, n_key_blocks):
  """How many key blocks query block i sees: those starting at or before its last query (a
  Python int when i and q_start are, as `count_flops` needs for a static trip count)."""
  minimum = min if isinstance(i, int) and isinstance(q_start, int) else jnp.minimum
  return minimum((q_start + (i + 1) * block - 1) // block + 1, n_key_blocks)


def _forward(q, k, v, qdoc, kdoc, q_start, keys, scale, block):
  """Online-softmax forward over blocked inputs: (o [N, B, H, P, V], lse [N, B, H, P])."""
  n_q, n_k = q.shape[0], k.shape[0]

  def query_block(i, seen=None):
    qi = q[i] * scale

    def key_block(j, carry):
      m, l, acc = carry
      s = jnp.einsum("bhpk,bhsk->bhps", qi, k[j])
      s = jnp.where(_mask(i, j, block, q_start, keys, qdoc, kdoc), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      # A fully masked block row leaves m at -inf; shift by 0 there (its p are all 0).
      shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))
      return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + p @ v[j]

    b, h = qi.shape[:2]
    init = (jnp.full((b, h, block), -jnp.inf), jnp.zeros((b, h, block)),
            jnp.zeros((b, h, block, v.shape[-1])))
    m, l, acc = jax.lax.fori_loop(
        0, _key_blocks_seen(i, block, q_start, n_k) if seen is None else seen, key_block, init)
    # Padded queries may see nothing (l = 0): give them a harmless 1, they are sliced off.
    l = jnp.where(l > 0, l, 1.0)
    return acc / l[..., None], m + jnp.log(l)

  if flops.counting():
    # count_flops needs static trip counts: unroll the query blocks with each one's count. A
    # traced start (a decode step or prefill after a cache) is counted as the cache's end: every
    # key block seen, the cost of a step with a full cache.
    outs = [query_block(i, _key_blocks_seen(i, block, q_start, n_k)
                        if isinstance(q_start, int) else n_k) for i in range(n_q)]
    return tuple(jnp.stack(parts) for parts in zip(*outs))
  return jax.lax.map(query_block, jnp.arange(n_q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(q, k, v, qdoc, kdoc, keys, scale, block):
  return _forward(q, k, v, qdoc, kdoc, 0, keys, scale, block)[0]


def _attend_fwd(q, k, v, qdoc, kdoc, keys, scale, block):
  o, lse = _forward(q, k, v, qdoc, kdoc, 0, keys, scale, block)
  return o, (q, k, v, qdoc, kdoc, o, lse)


def _attend_bwd(keys, scale, block, res, do):
  q, k, v, qdoc, kdoc, o, lse = res
  n_q = q.shape[0]
  delta = jnp.sum(do * o, axis=-1)                                        # [N, B, H, P]

  def key_block(dq, j):
    kj, vj = k[j], v[j]

    def query_block(i, carry):
      dk, dv, dq = carry
      s = jnp.einsum("bhpk,bhsk->bhps", q[i], kj) * scale
      s = jnp.where(_mask(i, j, block, 0, keys, qdoc, kdoc), s, -jnp.inf)
      p = jnp.exp(s - lse[i][..., None])
      dv = dv + jnp.einsum("bhps,bhpv->bhsv", p, do[i])
      ds = p * (jnp.einsum("bhpv,bhsv->bhps", do[i], vj) - delta[i][..., None])
      dk = dk + jnp.einsum("bhps,bhpk->bhsk", ds, q[i]) * scale
      dq = dq.at[i].add(jnp.einsum("bhps,bhsk->bhpk", ds, kj) * scale)
      return dk, dv, dq

    # Query blocks before j never see key block j (causality): start at j.
    dk, dv, dq = jax.lax.fori_loop(j, n_q, query_block,
                                   (jnp.zeros_like(kj), jnp.zeros_like(vj), dq))
    return dq, (dk, dv)

  if flops.counting():
    # Static trip counts for count_flops (see _forward): the key blocks unrolled in Python.
    dq, parts = jnp.zeros_like(q), []
    for j in range(k.shape[0]):
      dq, part = key_block(dq, j)
      parts.append(part)
    dk, dv = (jnp.stack(x) for x in zip(*parts))
    return dq, dk, dv, None, None
  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(q), jnp.arange(k.shape[0]))
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                             doc: jax.Array | None = None, block: int = 128,
                             q_start: jax.Array | int = 0,
                             key_doc: jax.Array | None = None,
                             confine_nonfinite: bool = True) -> jax.Array:
  """softmax(scale q k^T) v over the keys at or before each query (and of its document).

  Self-attention (q_start = 0, T_k = T) is differentiable with the recomputing backward pass;
  with q_start > 0 (queries continuing after T_k - T cached keys, a prefill) it is forward only.

  Args:
    q: [B, T, H, K], at absolute positions q_start .. q_start + T - 1.
    k: [B, T_k, H, K], at positions 0 .. T_k - 1.
    v: [B, T_k, H, V].
    scale: score multiplier.
    doc: optional int [B, T] document ids of the queries (None: one document).
    block: P, the block length of queries and keys.
    q_start: absolute position of the first query (int or int32 scalar); 0 for self-attention.
    key_doc: optional int [B, T_k] non-decreasing document ids of the keys (default: `doc`, for
      self-attention); with q_start > 0 the query at position p must be key p (a prefill).
    confine_nonfinite: non-finite inputs make NaN exactly the queries that can see them (as
      `masked_attention`). False skips that work, for callers whose inputs are finite by
      construction (the softmax layer, which confines a non-finite x itself).

  Returns:
    [B, T, H, V] float32.

  Raises:
    TypeError: `confine_nonfinite` is not a Python bool (the other arguments are the caller's to
      check: this op is the softmax layer's building block).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 300, 2, 8))
    >>> blocked_causal_attention(q, k, v, scale=8 ** -0.5, block=64).shape
    (1, 300, 2, 8)
  """
  guard = _checks.check_flag("confine_nonfinite", confine_nonfinite)
  self_attention = (key_doc is None and k.shape[1] == q.shape[1] and isinstance(q_start, int)
                    and q_start == 0)
  q_start = 0 if self_attention else jnp.asarray(q_start, jnp.int32)
  # One compiled program per shape when called eagerly; not while count_flops traces (a cached
  # trace of the loop form would be reused, and its trip counts cannot be counted).
  if isinstance(scale, (int, float)) and not flops.counting():
    return _compiled_blocked(q, k, v, doc, key_doc, q_start, scale=float(scale), block=block,
                             self_attention=self_attention, guard=guard)
  return _blocked(q, k, v, doc, key_doc, q_start, scale=scale, block=block,
                  self_attention=self_attention, guard=guard)


def _blocked(q, k, v, doc, key_doc, q_start, *, scale, block: int, self_attention: bool,
             guard: bool = True):
  """`blocked_causal_attention` after its keyword logic (see there)."""
  f32 = jnp.float32
  batch, time, _, _ = q.shape
  keys = k.shape[1]
  q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
  qdoc = jnp.zeros((batch, time), jnp.int32) if doc is None else doc.astype(jnp.int32)
  kdoc = qdoc if key_doc is None else key_doc.astype(jnp.int32)
  # Non-finite inputs are zeroed and the queries that see them set to NaN (see masked_attention).
  poisoned = None
  if guard:
    bad_q = segments.nonfinite(q)
    bad_kv = segments.nonfinite(k) | segments.nonfinite(v)
    q, = segments.zero_where(bad_q, q)
    k, v = segments.zero_where(bad_kv, k, v)
    if self_attention:
      poisoned = segments.sees_nonfinite(bad_kv, qdoc) | bad_q
    else:
      # Each query is also the key at its own position (a prefill writes it into the cache
      # before attending), so what it sees is what that key position sees.
      seen = segments.sees_nonfinite(bad_kv, kdoc)                        # [B, T_k, H]
      q_pos = jnp.clip(q_start + jnp.arange(time), 0, keys - 1)
      poisoned = jnp.take(seen, q_pos, axis=1) | bad_q

  n_q, n_k = -(-time // block), -(-keys // block)
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n * block - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  qb, kb, vb = _blocks(pad(q, n_q), n_q, block), _blocks(pad(k, n_k), n_k, block), _blocks(pad(v, n_k), n_k, block)
  qd = pad(qdoc, n_q).reshape(batch, n_q, block).transpose(1, 0, 2)
  kd = pad(kdoc, n_k).reshape(batch, n_k, block).transpose(1, 0, 2)
  if self_attention:
    o = _attend(qb, kb, vb, qd, kd, keys, scale, block)
  else:
    o = _forward(qb, kb, vb, qd, kd, jnp.asarray(q_start, jnp.int32), keys, scale, block)[0]
  o = o.transpose(1, 0, 3, 2, 4).reshape(batch, n_q * block, q.shape[2], -1)[:, :time]
  return o if poisoned is None else jnp.where(poisoned[..., None], jnp.nan, o)


_compiled_blocked = jax.jit(_blocked, static_argnames=("scale", "block", "self_attention",
                                                       "guard"))
