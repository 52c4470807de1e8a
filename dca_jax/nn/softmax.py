"""Causal multi-head softmax attention with rotary positions and a KV cache: the exact baseline.

Every past token is kept, so time is O(T^2 D) for a sequence and the decode cache grows by one key
and one value per token (O(max_length H K) memory, O(max_length) work per decoded token). DCA
matches it exactly while the context fits in its window and must beat it beyond.
"""

from __future__ import annotations

import math
import os
from typing import Any

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dca_jax.nn import _layer
from dca_jax.ops import _checks, sequence_parallel
from dca_jax.ops.rotary import apply_rotary
from dca_jax.ops.segments import document_ids
from dca_jax.ops.blocked_softmax import blocked_causal_attention
from dca_jax.ops import segments
from dca_jax.ops.softmax import attend_finite, masked_attention


class KVCache(NamedTuple):
  """Decode cache of `SoftmaxAttention`: every key and value seen so far.

  Attributes:
    k: [B, L, H, K] float32 keys, already rotated at their absolute positions; slots at and after
      `position` are unused (zeros). L = max_length.
    v: [B, L, H, V] float32 values.
    position: int32 scalar, the number of tokens seen, i.e. the absolute position of the next one.
    doc_start: int32 [B], the absolute position where each row's current document began (keys
      before it are never attended; see `prefill`'s reset).
    overflow: bool scalar, true once tokens were given past max_length (possible only under jit,
      where the position cannot be checked): their outputs, and all later ones, are NaN.
    doc_bad: bool [B, H], true once the current document of a row held a non-finite key or
      value (stored as zeros): later outputs of that document are NaN, as in the forward.
  """

  k: jax.Array
  v: jax.Array
  position: jax.Array
  doc_start: jax.Array
  overflow: jax.Array
  doc_bad: jax.Array

  @property
  def max_length(self) -> int:
    """L, the number of tokens the cache can hold (a static shape)."""
    return self.k.shape[1]


# Score matrices up to this many bytes are formed whole (one fused matmul, fastest for short
# sequences and single decode steps); larger ones go through the blocked form, whose memory is
# linear in T. 2 float32 copies of [B, H, T, T_k] (T_k keys; scores and their exponentials) are
# counted.
DENSE_SCORES_BYTES = 64 * 2**20
BLOCK = 128


def _dense_fits(batch: int, heads: int, queries: int, keys: int) -> bool:
  return 2 * 4 * batch * heads * queries * keys <= DENSE_SCORES_BYTES


def _memory_limit() -> tuple[int | None, str]:
  """(bytes, what) the default device can hold: its allocator limit, else the host's RAM."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} memory"
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
  except (ValueError, OSError, AttributeError):
    return None, "memory"


def check_cache_fits(batch_size: int, max_length: int, heads: int, head_dim: int) -> None:
  """Refuses, before anything is allocated, a KV cache larger than the device's memory.

  Raises:
    MemoryError: naming max_length, the bytes the cache needs and the bytes available.
  """
  need = 2 * 4 * batch_size * max_length * heads * head_dim
  limit, where = _memory_limit()
  if limit is not None and need > limit:
    raise MemoryError(
        f"a SoftmaxAttention cache of max_length = {max_length} (batch {batch_size}, {heads} heads "
        f"of {head_dim}) needs {need / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB of "
        f"{where}: its keys and values grow with every token. Use a shorter max_length, or "
        f"SlidingWindowAttention / DCAttention, whose caches have a constant size.")


class SoftmaxAttention(_layer.AttentionLayer):
  r"""Causal multi-head softmax attention with rotary positions and a KV cache.

  With q_t, k_t, v_t the per-head projections of x_t (K = V = d_model / H) and R_p the rotary
  rotation at absolute position p (`dca_jax.ops.rotary.apply_rotary`):

      o_t = sum_{j <= t, doc(j) = doc(t)} softmax_j( (R_t q_t) . (R_j k_j) / sqrt(K) ) v_j,
      y_t = W_o concat_heads(o_t).

  Positions are absolute (0..T-1) even across a `reset`: rotary scores depend only on p - j, so
  restarting the positions of a document would not change anything; resets only mask the keys
  of other documents. Scores, softmax and the cache are float32 whatever the compute dtype.

  Cache overflow: a `prefill` or `decode_step` that would go past the cache's max_length raises
  a ValueError when the cache position is concrete (eager calls); `generate` checks its prompt
  and budget against max_length before compiling. Under `jit` the position is a tracer and cannot
  be checked; then tokens beyond max_length are not stored, their outputs and those of every
  later call on that cache are NaN, and `cache.overflow` becomes true, so the NaN is never
  silent: an overflow is never quietly wrong (dropping the keys and returning finite numbers
  would be).

  Shapes and args d_model, num_heads, rngs, dtype, param_dtype: see `AttentionLayer`.

  Args:
    rotary_base: base of the rotary frequencies.
    short_conv: the width of a causal depthwise convolution over the input of the q, k, v
      projections (DCA's, `causal_short_conv`, initialised as the identity); 0 (default): none.
      With short_conv > 0 the cache is a `ConvCache` of the `KVCache` and the last
      short_conv - 1 inputs.
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): every shard gathers all keys,
      values and resets (`all_gather`) and attends its queries to them, so each device holds
      O(T) keys and O(T / shards x T) scores: correct, not memory-scalable (ring attention, which
      passes key blocks around the shards, is the scalable form and is not implemented).
      Calls only (prefill and decoding are not sharded).

  Raises:
    ValueError: num_heads does not divide d_model, either is not an integer >= 1, or short_conv
      is not an integer >= 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SoftmaxAttention(32, 4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    >>> cache = layer.init_cache(2, max_length=16)
    >>> y, cache = layer.prefill(x[:, :6], cache)
    >>> y_t, cache = layer.decode_step(x[:, 6], cache)
    >>> layer(x).shape, y_t.shape, int(cache.position)
    ((2, 10, 32), (2, 32), 7)

  References:
    Vaswani et al. 2017, "Attention Is All You Need", sec. 3.2; Su et al. 2021, "RoFormer".
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, rotary_base: float = 10000.0,
               short_conv: int = 0, sequence_axis: Any = None):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    _layer.check_rotary_head_dim(d_model, num_heads, self.head_dim)
    self.sequence_axis = sequence_axis
    self.rotary_base = float(rotary_base)
    self._init_short_conv(short_conv, d_model)
    self.q_proj = self._linear(d_model, d_model, rngs)
    self.k_proj = self._linear(d_model, d_model, rngs)
    self.v_proj = self._linear(d_model, d_model, rngs)
    self.out_proj = self._linear(d_model, d_model, rngs)

  def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries and keys and the values, each [B, T, H, K]."""
    heads = self.num_heads
    q = apply_rotary(_layer.split_heads(self.q_proj(x), heads), positions, base=self.rotary_base)
    k = apply_rotary(_layer.split_heads(self.k_proj(x), heads), positions, base=self.rotary_base)
    v = _layer.split_heads(self.v_proj(x), heads)
    return q, k, v

  def _sequence(self, x: jax.Array, reset: jax.Array | None) -> jax.Array:
    """Full causal attention over x (see `AttentionLayer.__call__`)."""
    if self.sequence_axis is not None:
      return self._sharded_sequence(x, reset, self.sequence_axis)
    batch, time = x.shape[:2]
    # NumPy positions: the rotary tables are constants of the program (`apply_rotary`).
    positions = np.arange(time, dtype=np.int32)
    q, k, v = self._project(self._convolve(x, reset), positions)
    doc = None if reset is None else document_ids(reset)            # [B, T]
    scale = 1.0 / math.sqrt(self.head_dim)
    # x is confined by `__call__` (a non-finite token zeroed, the outputs that see it NaN), so
    # q, k, v are finite for finite parameters, barring overflow, and the ops' own confinement
    # is skipped (see `DCAttention._sequence`).
    if not _dense_fits(batch, self.num_heads, time, time):
      o = blocked_causal_attention(q, k, v, scale=scale, doc=doc, block=BLOCK,
                                   confine_nonfinite=False)
      return self._output(o, x.dtype)
    steps = jnp.arange(time, dtype=jnp.int32)   # in the program: no [T, T] constant
    mask = (steps[:, None] >= steps[None, :])[None]               # [1, T, T]
    if doc is not None:
      mask = mask & (doc[:, :, None] == doc[:, None, :])
    o = attend_finite(q, k, v, mask, scale)
    return self._output(o, x.dtype)

  def _sharded_sequence(self, x: jax.Array, reset: jax.Array | None, axis_name: Any) -> jax.Array:
    """This shard's outputs when T is sharded over `axis_name` (see `sequence_axis`)."""
    batch, time = x.shape[:2]
    sequence_parallel.check_axis_name(axis_name)
    index = jax.lax.axis_index(axis_name).astype(jnp.int32)
    history = self._shard_history(x, reset, axis_name)
    positions = index * time + jnp.arange(time, dtype=jnp.int32)
    q, k, v = self._project(self._convolve(x, reset, history, axis_name), positions)
    k_all, v_all = (jax.lax.all_gather(a, axis_name, axis=1, tiled=True) for a in (k, v))
    total = k_all.shape[1]
    all_positions = jnp.arange(total, dtype=jnp.int32)
    mask = (positions[:, None] >= all_positions[None, :])[None]     # [1, T, T_all]
    if reset is not None:
      doc_all = document_ids(jax.lax.all_gather(reset, axis_name, axis=1, tiled=True))
      doc = jax.lax.dynamic_slice_in_dim(doc_all, index * time, time, axis=1)
      mask = mask & (doc[:, :, None] == doc_all[:, None, :])
    o = masked_attention(q, k_all, v_all, mask, 1.0 / math.sqrt(self.head_dim))
    return self._output(o, x.dtype)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache | _layer.ConvCache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (O(B L D) floats), in a
    `ConvCache` with a short convolution.

    Raises:
      ValueError: batch_size or max_length not an integer >= 1.
    """
    _layer.check_cache_size(batch_size, max_length)
    check_cache_fits(batch_size, max_length, self.num_heads, self.head_dim)
    shape = (batch_size, max_length, self.num_heads, self.head_dim)
    cache = KVCache(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32),
                    position=jnp.zeros((), jnp.int32),
                    doc_start=jnp.zeros((batch_size,), jnp.int32),
                    overflow=jnp.zeros((), jnp.bool_),
                    doc_bad=jnp.zeros((batch_size, self.num_heads), jnp.bool_))
    return self._with_conv_cache(cache, batch_size)

  def prefill(self, x: jax.Array, cache: KVCache | _layer.ConvCache,
              reset: jax.Array | None = None) -> tuple[jax.Array, KVCache | _layer.ConvCache]:
    """Attends x to itself and to everything in the cache; appends x's keys and values.

    Two prefills chain exactly like one over the concatenated input. A prefill whose T x
    max_length scores exceed `DENSE_SCORES_BYTES` runs the blocked form with a traced start
    position, which is forward only (use `__call__` to train).

    Args:
      x: [B, T, D] floating, at absolute positions cache.position ... cache.position + T - 1.
      cache: a `KVCache` with batch size B (a `ConvCache` of one with a short convolution).
      reset: optional bool [B, T]; true where a new document starts (nothing before it, cached
        or not, is attended from there on).

    Returns:
      (y [B, T, D] in x's dtype, the cache with T more tokens).

    Raises:
      TypeError, ValueError: bad x or a cache of another batch size or configuration.
      ValueError: naming max_length, when the tokens would not fit in a concrete cache (under jit
        see the class docstring: outputs past max_length are NaN).
    """
    head_shape = (None, None, self.num_heads, self.head_dim)
    cache, inputs = self._check_prefill(x, cache, KVCache, {"k": head_shape, "v": head_shape})
    self._check_prefill_args(x, reset)
    conv_input, x = x, self._convolve(x, reset, inputs)
    time = x.shape[1]
    max_length = cache.max_length
    if _checks.is_concrete(cache.position):
      start = int(cache.position)
      if start + time > max_length:
        raise ValueError(
            f"the cache's max_length = {max_length} is too small: it holds {start} tokens and "
            f"{time} more were given; build it with init_cache(batch_size, max_length >= "
            f"{start + time}).")
    positions = cache.position + jnp.arange(time, dtype=jnp.int32)
    q, k, v = self._project(x, positions)
    doc = jnp.zeros(x.shape[:2], jnp.int32) if reset is None else document_ids(reset)
    # Only finite keys and values are stored (a non-finite one as zeros), so no step re-scans the
    # cache; what a query can see of bad tokens is tracked instead (doc_bad carries it over).
    bad_q = segments.nonfinite(q)
    bad_kv = segments.nonfinite(k) | segments.nonfinite(v)
    q, = segments.zero_where(bad_q, q)
    k, v = segments.zero_where(bad_kv, k, v)
    sees_bad = segments.sees_nonfinite(bad_kv, doc, carried=cache.doc_bad)     # [B, T, H]
    # mode="drop": past max_length (only reachable under jit) nothing is written, rather than
    # the clamped overwrite of the last slots that dynamic_update_slice would do.
    k_buf = cache.k.at[:, positions].set(k.astype(jnp.float32), mode="drop")
    v_buf = cache.v.at[:, positions].set(v.astype(jnp.float32), mode="drop")
    # Slots after the last written one are zeros; causality masks them. Documents: a cached key
    # is in the current document from doc_start on (id 0, else -1); new tokens count their resets.
    slots = jnp.arange(max_length, dtype=jnp.int32)
    cached_doc = jnp.where(slots[None] >= cache.doc_start[:, None], 0, -1)             # [B, L]
    new_doc = jnp.take_along_axis(doc, jnp.clip(slots - cache.position, 0, time - 1)[None]
                                  .repeat(doc.shape[0], 0), axis=1)
    key_doc = jnp.where(slots[None] < cache.position, cached_doc, new_doc)
    scale = 1.0 / math.sqrt(self.head_dim)
    if _dense_fits(x.shape[0], self.num_heads, time, max_length):
      mask = (slots[None, :] <= positions[:, None])[None] & (key_doc[:, None, :] == doc[:, :, None])
      o = attend_finite(q, k_buf, v_buf, mask, scale)
    else:
      o = blocked_causal_attention(q, k_buf, v_buf, scale=scale, doc=doc, key_doc=key_doc,
                                   q_start=cache.position, block=BLOCK)
    overflow = cache.overflow | (cache.position + time > max_length)
    fits = (positions < max_length)[None, :, None] & ~cache.overflow
    o = jnp.where((fits & ~sees_bad & ~bad_q)[..., None], o, jnp.nan)
    new_cache = KVCache(k=k_buf, v=v_buf, position=cache.position + time,
                        doc_start=_layer.next_doc_start(cache.doc_start, cache.position, reset),
                        overflow=overflow, doc_bad=sees_bad[:, -1])
    return self._output(o, x.dtype), self._join_conv_cache(new_cache, inputs, conv_input)

