"""Sliding-window softmax attention with rotary positions: DCA's working memory on its own.

Each token attends exactly to the last W tokens (itself included), so a sequence costs
O(T W D) and decoding keeps a ring buffer of W keys and values: constant memory and work per
token, whatever the context length. Tokens older than W are forgotten entirely, which is the gap
DCA's compressed memory fills.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import _layer
from dca_jax.ops import _checks, dca_memory, segments, sequence_parallel
from dca_jax.ops.rotary import apply_rotary
from dca_jax.ops.window import (rotary_window_attention, sliding_window_attention,
                                window_step_parts)


class WindowCache(NamedTuple):
  """Decode cache of `SlidingWindowAttention`: a ring buffer of the last W keys and values.

  The token at absolute position p lives in slot p mod W. Its size does not depend on
  max_length. Only finite keys and values are stored: a token whose key or value is not finite
  in a head is stored there as zeros and its position kept in `bad_at`, so that a decoding
  step reads no buffered value it must guard (0 x NaN would be NaN) and scans none.

  Attributes:
    k: [B, H, W, K] float32 keys, rotated at their absolute positions (heads first: a decoding
      step's products then have their batch dims leading, with no transpose of the buffers).
    v: [B, H, W, V] float32 values.
    position: int32 scalar, the number of tokens seen (the position of the next one). Slots of
      positions < 0 (before the first W tokens) hold zeros and are masked.
    doc_start: int32 [B], the absolute position where each row's current document began; slots
      of earlier positions are masked (see `prefill`'s reset).
    bad_at: int32 [B, H], the absolute position of the last token whose key or value was not
      finite in that head (-1: none). A query at t is NaN in a head where
      bad_at >= max(t - W + 1, doc_start): that token is in its window and document.
  """

  k: jax.Array
  v: jax.Array
  position: jax.Array
  doc_start: jax.Array
  bad_at: jax.Array


class SlidingWindowAttention(_layer.AttentionLayer):
  r"""Causal multi-head softmax attention over the last `window` tokens, with rotary positions.

  As `SoftmaxAttention`, but token t attends only to positions j with t - W < j <= t (and of
  its own document when `reset` is given):

      o_t = sum_{t-W < j <= t, doc(j) = doc(t)} softmax_j( (R_t q_t) . (R_j k_j) / sqrt(K) ) v_j.

  When T <= W it is exactly causal softmax attention. The computation is
  `dca_jax.ops.window.sliding_window_attention`, linear in T.

  The cache (`WindowCache`) is a ring buffer of W slots whatever `max_length` is; positions are
  absolute and kept in an int32 counter (valid up to 2^31 tokens; rotary angles lose precision
  in float32 long before, see `apply_rotary`, but queries and keys at the same positions share
  the same rounding).

  Shapes and args d_model, num_heads, rngs, dtype, param_dtype: see `AttentionLayer`; the head
  dim D / H must be even (rotary).

  Args:
    window: W >= 1, tokens each query sees, itself included.
    rotary_base: base of the rotary frequencies.
    short_conv: the width of a causal depthwise convolution over the input of the q, k, v
      projections (DCA's, `causal_short_conv`, initialised as the identity); 0 (default): none.
      A token then sees the inputs of its last W + short_conv - 1 tokens. With short_conv > 0
      the cache is a `ConvCache` of the `WindowCache` and the last short_conv - 1 inputs.
    segment_length: "auto" (default), an integer L_seg (>= the window, if any), or None: a call
      over more than L_seg tokens runs as a scan over segments continuing the cache
      (`AttentionLayer._segmented`; "auto": `dca_jax.ops.segment_length`, one pass on every
      backend today, where it measured faster; None: always one pass; an integer bounds the
      memory of a long call).
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): the previous shard's last W
      keys and values (and short_conv - 1 inputs of the convolution) arrive by `ppermute`,
      positions are absolute. Needs W <= the shard's length. Calls only (prefill and decoding
      are not sharded).

  Raises:
    ValueError: num_heads does not divide d_model, an odd head dim, window not an integer >= 1
      or short_conv not an integer >= 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = SlidingWindowAttention(32, 4, window=8, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 20, 32))
    >>> cache = layer.init_cache(2, max_length=1_000_000)  # 8 slots, not a million
    >>> y, cache = layer.prefill(x, cache)
    >>> cache.k.shape, y.shape
    ((2, 4, 8, 8), (2, 20, 32))

  References:
    Beltagy et al. 2020, "Longformer", sec. 3.1; Su et al. 2021, "RoFormer".
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, window: int = 64, rotary_base: float = 10000.0,
               short_conv: int = 0, segment_length: int | str | None = "auto",
               sequence_axis: Any = None):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    _checks.check_positive_int("window", window)
    self.sequence_axis = sequence_axis
    self._init_segments(segment_length, window)
    _layer.check_rotary_head_dim(d_model, num_heads, self.head_dim)
    self.window = int(window)
    self.rotary_base = float(rotary_base)
    self._init_short_conv(short_conv, d_model)
    self.q_proj = self._linear(d_model, d_model, rngs)
    self.k_proj = self._linear(d_model, d_model, rngs)
    self.v_proj = self._linear(d_model, d_model, rngs)
    self.out_proj = self._linear(d_model, d_model, rngs)

  def _project(self, x: jax.Array,
               positions: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and keys rotated at `positions` (None: not rotated) and the values, each
    [B, T, H, K] float32."""
    heads, f32 = self.num_heads, jnp.float32
    q = _layer.split_heads(self.q_proj(x), heads).astype(f32)
    k = _layer.split_heads(self.k_proj(x), heads).astype(f32)
    if positions is not None:
      q = apply_rotary(q, positions, base=self.rotary_base)
      k = apply_rotary(k, positions, base=self.rotary_base)
    v = _layer.split_heads(self.v_proj(x), heads).astype(f32)
    return q, k, v

  def _reach(self) -> int:
    # The convolution hands each key its short_conv - 1 predecessors.
    return self.window + max(self.short_conv - 1, 0)

  def _sequence(self, x: jax.Array, reset: jax.Array | None) -> jax.Array:
    """Sliding-window attention over x (see `AttentionLayer.__call__`)."""
    if self.sequence_axis is not None:
      return self._sharded_sequence(x, reset, self.sequence_axis)
    # Rotated inside the window op, by in-block offsets (see `rotary_window_attention`).
    q, k, v = self._project(self._convolve(x, reset), None)
    # x is confined by `__call__` (a non-finite token is zeroed, the outputs that see it NaN).
    o = rotary_window_attention(q, k, v, window=self.window, rotary_base=self.rotary_base,
                                reset=reset)
    return self._output(o, x.dtype)

  def _sharded_sequence(self, x: jax.Array, reset: jax.Array | None, axis_name: Any) -> jax.Array:
    """This shard's outputs when T is sharded over `axis_name`: the shard's tokens are preceded
    by the previous shard's last W keys and values (one `ppermute`; zeros on the first shard,
    which a reset at its first token keeps out of every window), and the outputs of those W
    extra positions are dropped."""
    batch, time, window = x.shape[0], x.shape[1], self.window
    sequence_parallel.check_axis_name(axis_name)
    index = jax.lax.axis_index(axis_name).astype(jnp.int32)
    history = self._shard_history(x, reset, axis_name)
    # Rotated inside the window op by in-block offsets (`rotary_window_attention`): scores
    # depend on positions only through their differences, so the shard's offset drops out.
    q, k, v = self._project(self._convolve(x, reset, history, axis_name), None)
    flags = jnp.zeros((batch, time), bool) if reset is None else reset
    halo_k, halo_v, halo_reset = sequence_parallel.previous_tail((k, v, flags), window, axis_name)
    # The first real token starts a document on the first shard (its halo is empty).
    first = flags[:, :1] | (index == 0)
    ext_reset = jnp.concatenate([halo_reset, first, flags[:, 1:]], axis=1)
    ext = [jnp.concatenate([h, a], axis=1) for h, a in ((halo_k, k), (halo_v, v))]
    ext_q = jnp.concatenate([jnp.zeros_like(q[:, :window]), q], axis=1)
    o = rotary_window_attention(ext_q, ext[0], ext[1], window=window,
                                rotary_base=self.rotary_base, reset=ext_reset,
                                confine_nonfinite=True)
    return self._output(o[:, window:], x.dtype)

  def init_cache(self, batch_size: int, max_length: int) -> WindowCache | _layer.ConvCache:
    """An empty ring buffer of W slots (in a `ConvCache` with a short convolution); `max_length`
    is only validated (any length fits).

    Raises:
      ValueError: batch_size or max_length not an integer >= 1.
    """
    _layer.check_cache_size(batch_size, max_length)
    shape = (batch_size, self.num_heads, self.window, self.head_dim)
    cache = WindowCache(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32),
                        position=jnp.zeros((), jnp.int32),
                        doc_start=jnp.zeros((batch_size,), jnp.int32),
                        bad_at=jnp.full((batch_size, self.num_heads), -1, jnp.int32))
    return self._with_conv_cache(cache, batch_size)

  def decode_step(self, x_t: jax.Array, cache: WindowCache | _layer.ConvCache,
                  reset: jax.Array | None = None) -> tuple[jax.Array, WindowCache | _layer.ConvCache]:
    """One token per row: writes its key and value into its ring slot, attends over the W slots.

    O(W K) per token whatever the position (one query against W keys; no re-scoring of the
    cached tokens). Equal to `prefill(x_t[:, None], cache, reset[:, None])`.

    Args:
      x_t: [B, D] the current token, at absolute position cache.position.
      cache: a `WindowCache` with batch size B (a `ConvCache` of one with a short convolution).
      reset: optional bool [B]; true in a row where a new document starts at this token.

    Returns:
      (y_t [B, D] in x_t's dtype, the updated cache).

    Raises:
      TypeError, ValueError: bad x_t, reset or cache.
    """
    window = self.window
    _layer.check_token(x_t, self.d_model)
    head_shape = (None, self.num_heads, window, self.head_dim)
    cache, inputs = self._split_conv_cache(cache, x_t.shape[0])
    _layer.check_cache(cache, WindowCache, x_t.shape[0],
                       {"k": head_shape, "v": head_shape,
                        "bad_at": (None, self.num_heads)})
    _checks.check_step_reset(reset, x_t.shape[0])
    t = cache.position
    x_c = self._convolve(x_t[:, None], None if reset is None else reset[:, None], inputs)
    q, k, v = self._project(x_c, t[None])                                 # [B, 1, H, K]
    # The buffers hold finite values only (see `WindowCache`): a non-finite key or value is
    # stored as zeros and its position kept; the outputs that see it are set to NaN below.
    bad_q = segments.nonfinite(q)[:, 0]                                   # [B, H]
    bad_kv = segments.nonfinite(k)[:, 0] | segments.nonfinite(v)[:, 0]
    q, = segments.zero_where(bad_q[:, None], q)
    k, v = segments.zero_where(bad_kv[:, None], k, v)
    bad_at = jnp.where(bad_kv, t, cache.bad_at)
    slot = t % window
    doc_start = cache.doc_start if reset is None else jnp.where(reset, t, cache.doc_start)
    first = jnp.maximum(doc_start, 0)[:, None]
    # The two orders of `dca_memory.read_before_write`: at batch 1 the buffers are read before
    # the new token is written into them (the token comes apart) and the write is ordered after
    # the read, which spares XLA:CPU its copies of the buffers; at larger batches the write comes
    # first. Before the write, slot s holds position t - W + ((s - t) mod W): the slot about to
    # be written holds t - W, which has left the window.
    if dca_memory.read_before_write(x_t.shape[0]):
      ahead = (jnp.arange(window, dtype=jnp.int32) - t) % window           # [W]
      seen = (ahead[None, :] >= 1) & ((t - window + ahead)[None, :] >= first)
      num, den, _ = window_step_parts(q[:, 0], cache.k, cache.v, seen, new=(k[:, 0], v[:, 0]))
      k_row, v_row = dca_memory.ordered_after((k[:, 0], v[:, 0]), num, t)   # after the read
      keys = cache.k.at[:, :, slot].set(k_row)                              # [B, H, W, K]
      values = cache.v.at[:, :, slot].set(v_row)
    else:
      keys = cache.k.at[:, :, slot].set(k[:, 0])
      values = cache.v.at[:, :, slot].set(v[:, 0])
      # Slot s holds position t - ((t - s) mod W); it is seen if that is in the document.
      held = t - (t - jnp.arange(window, dtype=jnp.int32)) % window        # [W]
      num, den, _ = window_step_parts(q[:, 0], keys, values, held[None, :] >= first)
    sees_bad = bad_at >= jnp.maximum(t - window + 1, doc_start)[:, None]   # [B, H]
    o = jnp.where((bad_q | sees_bad)[..., None], jnp.nan, num / den[..., None])[:, None]
    new_cache = WindowCache(k=keys, v=values, position=t + 1, doc_start=doc_start,
                            bad_at=bad_at)
    return (self._output(o, x_t.dtype)[:, 0],
            self._join_conv_cache(new_cache, inputs, x_t[:, None]))

  def prefill(self, x: jax.Array, cache: WindowCache | _layer.ConvCache,
              reset: jax.Array | None = None) -> tuple[jax.Array, WindowCache | _layer.ConvCache]:
    """Window attention over x continuing from the cache; the ring keeps the last W tokens.

    The W cached tokens are laid out in time order before x and the window op runs over the
    W + T tokens; a document boundary placed before the first real token masks the empty slots
    of a young cache. Cost O((W + T) W D), independent of the position.

    Args:
      x: [B, T, D] floating, at absolute positions cache.position ... cache.position + T - 1.
      cache: a `WindowCache` with batch size B (a `ConvCache` of one with a short convolution).
      reset: optional bool [B, T]; true where a new document starts (nothing before it, cached
        or not, is attended from there on).

    Returns:
      (y [B, T, D] in x's dtype, the updated cache).

    Raises:
      TypeError, ValueError: bad x, or a cache of another batch size or configuration.
    """
    window = self.window
    head_shape = (None, self.num_heads, window, self.head_dim)
    cache, inputs = self._check_prefill(x, cache, WindowCache, {"k": head_shape, "v": head_shape,
                                                                "bad_at": (None, self.num_heads)})
    self._check_prefill_args(x, reset)
    batch, time = x.shape[:2]
    start = cache.position
    q, k, v = self._project(self._convolve(x, reset, inputs),
                            start + jnp.arange(time, dtype=jnp.int32))

    # Past slot c (0..W-1) holds position start - W + c, found at ring index (start + c) mod W.
    order = (start + jnp.arange(window, dtype=jnp.int32)) % window
    k_all = jnp.concatenate([jnp.swapaxes(jnp.take(cache.k, order, axis=2), 1, 2), k],
                            axis=1)                                          # [B, W + T, H, K]
    v_all = jnp.concatenate([jnp.swapaxes(jnp.take(cache.v, order, axis=2), 1, 2), v], axis=1)
    q_all = jnp.concatenate([jnp.zeros_like(k_all[:, :window]), q], axis=1)
    # Slots c < W - (start - doc_start) hold no token of the current document (or none at all):
    # start a document at the first one that does, and at every reset of x.
    first = jnp.clip(window - (start - cache.doc_start), 0, window)                  # [B]
    resets = jnp.arange(window + time)[None, :] == first[:, None]
    if reset is not None:
      resets = resets | jnp.pad(reset, ((0, 0), (window, 0)))
    # The op confines the new tokens' non-finite values; the cached ones are stored as zeros
    # (`WindowCache`), and the queries whose window and document hold one are set to NaN here.
    o = sliding_window_attention(q_all, k_all, v_all, window=window, reset=resets)[:, window:]
    positions = start + jnp.arange(time, dtype=jnp.int32)
    doc_from = cache.doc_start[:, None]                                              # [B, 1]
    if reset is not None:   # where each query's document starts
      doc_from = jnp.maximum(doc_from, jax.lax.cummax(jnp.where(reset, positions, -1), axis=1))
    sees_bad = (cache.bad_at[:, None, :]
                >= jnp.maximum(positions - window + 1, doc_from)[..., None])         # [B, T, H]
    o = jnp.where(sees_bad[..., None], jnp.nan, o)

    # Only the last min(T, W) tokens survive; their slots are distinct, so the scatter is exact.
    keep = min(time, window)
    slots = (start + time - keep + jnp.arange(keep, dtype=jnp.int32)) % window
    bad_kv = segments.nonfinite(k) | segments.nonfinite(v)                           # [B, T, H]
    k, v = segments.zero_where(bad_kv, k, v)
    last_bad = jnp.max(jnp.where(bad_kv, positions[None, :, None], -1), axis=1)       # [B, H]
    kept_k, kept_v = (jnp.swapaxes(x[:, time - keep:], 1, 2) for x in (k, v))     # [B, H, keep, .]
    new_cache = WindowCache(k=cache.k.at[:, :, slots].set(kept_k),
                            v=cache.v.at[:, :, slots].set(kept_v),
                            position=start + time,
                            doc_start=_layer.next_doc_start(cache.doc_start, start, reset),
                            bad_at=jnp.maximum(cache.bad_at, last_bad))
    return self._output(o, x.dtype), self._join_conv_cache(new_cache, inputs, x)
