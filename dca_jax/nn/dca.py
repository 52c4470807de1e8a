"""`DCAttention`: the Flax NNX layer of Dynamic Compression Attention.

The layer owns the parameters and wires the pure functions of `dca_jax.ops.dca` together:
`compute_weights` -> `attention_compress` (whole sequence, prefill) or `memory_state_update`
(one decoding step) -> output projection. Its cache is a `DCAState` whose size depends on the
window, heads and feature dimension, never on the context length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax import ops
from dca_jax.nn import _layer
from dca_jax.ops import _checks, sequence_parallel


class DCAConvCache(NamedTuple):
  """Decode cache of a `DCAttention` with a short convolution (`short_conv` > 0).

  Attributes:
    state: the `DCAState` of the attention (a `DCADeltaState` with memory="delta").
    inputs: [B, short_conv - 1, D] float32, the layer inputs of the last short_conv - 1 tokens,
      oldest first (zeros before the first token).
  """

  state: ops.DCAState
  inputs: jax.Array

  @property
  def position(self) -> jax.Array:
    """int32 scalar, the number of tokens seen (as every layer's cache has)."""
    return self.state.position


class DCAttention(_layer.AttentionLayer):
  """Dynamic Compression Attention: exact softmax over the last `window` tokens + compressed memory.

  Args:
    d_model: D, model width.
    num_heads: H; must divide D (head dim K = V = D / H).
    rngs: `nnx.Rngs` for the initialisation.
    window: W, tokens kept exactly (default 64).
    feature_dim: P, the size of the projected queries/keys fed to the feature map (default 8;
      the Taylor map turns them into F = 1 + P + P (P + 1) / 2 = 45 features). Chosen by
      docs/feature_study.md: P = 8, 12 and 16 reach the same test bits per byte on the corpus
      LM within one seed's noise, and P = 8 is the fastest of them.
    feature_map: "taylor" (default) or "elu".
    combine: "unified" (default: window and memory share one softmax normaliser) or "gated"
      (each normalised on its own, mixed by a learned per-head sigmoid gate of the input).
    decay: "head" (default: one data-dependent rate per head) or "channel" (one per memory row,
      low rank `decay_rank`).
    decay_rank: rank of the per-channel rate projection.
    memory: "additive" (default: M <- a M + phi(k) [v, 1]^T, read under the window's normaliser)
      or "delta": the memory is updated by the gated delta rule on L2-normalised keys with a
      writing strength beta = sigmoid(x W_b) per head and token, and its read-out S^T q^ (S the
      memory, q^ the L2-normalised query) is added to the window's softmax through a per-head
      gate sigmoid(x W_g + b_g), b_g = -2 at initialisation (`dca_jax.ops.dca_delta`). Still
      exactly causal softmax when T <= W. Needs combine="unified" and decay="head"; feature_map
      and feature_dim are unused. The cache is then a `DCADeltaState` (memory [B, H, K, V]).
    short_conv: the width of a depthwise causal convolution over the layer input before the
      projections (default 4, initialised as the identity; 0: none). It hands each token its
      neighbours, which recall needs (the ablations in docs/benchmark_results.md). With
      short_conv > 0 the decode cache is a `DCAConvCache`: the `DCAState` plus the last
      short_conv - 1 inputs.
    max_half_life_ratio: heads are initialised with half-lives spread from W to this times W.
    rotary_base: rotary base for the window (None: no positions).
    mode: engine form for the compressed memory ("auto" follows `adaptive_scale`).
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): the convolution's last
      short_conv - 1 inputs and the window's last W tokens come from the previous shard by
      `ppermute`, the memory's state as in `attention_compress(..., axis_name=)`, for either
      memory. Calls only (`prefill` inside shard_map over this axis raises;
      `attention_compress(..., axis_name=..., return_state=True)` is the sharded prefill). A
      non-finite input poisons outputs of its own shard only.
    chunk_size: engine chunk size (None: the planner's).
    segment_length: "auto" (default), an integer L_seg >= `window`, or None. A call over more
      than L_seg tokens then runs as a `jax.lax.scan` over segments of L_seg tokens, each
      continuing the previous one's cache as `prefill` does (the same function: outputs and
      gradients agree with one pass), so that one segment's intermediates are live at a time;
      "auto" asks `dca_jax.ops.segment_length` (one pass on every backend today: on the 2-core
      CPU one pass measured faster up to T = 65536); None: always one pass; an integer bounds
      the memory of a long call. Not with `sequence_axis`.
    dtype: compute dtype (default: the input's).
    param_dtype: parameter dtype (default float32).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = DCAttention(32, 2, window=8, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 20, 32))
    >>> layer(x).shape
    (1, 20, 32)
    >>> cache = layer.init_cache(1, max_length=1_000_000)
    >>> y, cache = layer.prefill(x, cache)
    >>> y_t, cache = layer.decode_step(x[:, 0], cache)
    >>> y_t.shape
    (1, 32)
  """

  no_weight_decay = frozenset({"decay", "decay_bias", "decay_up"})

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, window: int = 64,
               feature_dim: int = 8, feature_map: ops.FeatureMap | str = "taylor",
               combine: str = "unified", decay: str = "head", decay_rank: int = 16,
               memory: ops.MemoryKind | str = "additive", short_conv: int = 4, max_half_life_ratio: float = 16.0,
               rotary_base: float | None = 10000.0, mode: ops.Mode | str = "auto",
               chunk_size: int | None = None, segment_length: int | str | None = "auto",
               sequence_axis=None, dtype=None, param_dtype=jnp.float32):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    self.sequence_axis = sequence_axis
    _layer.check_short_conv(short_conv)
    head_dim = self.head_dim
    self.feature_map = ops.FeatureMap.parse(feature_map)
    self.num_features = ops.feature_dim(self.feature_map, feature_dim)
    # init_params checks window, feature_dim, combine, decay and decay_rank (the one boundary).
    init = ops.init_params(rngs.params(), d_model, num_heads, window=window, head_dim=head_dim,
                           feature_dim=feature_dim, max_half_life_ratio=max_half_life_ratio,
                           num_features=self.num_features, combine=combine, decay=decay,
                           decay_rank=decay_rank, memory=memory)
    self.memory = ops.MemoryKind.parse(memory)
    # attention_compress checks mode and chunk_size; do it here too, so a bad option fails when
    # the layer is built rather than at its first call.
    ops.adaptive_scale(1, window=window, mode=mode, chunk_size=chunk_size)
    self.window, self.rotary_base = window, rotary_base
    self.mode, self.chunk_size = ops.Mode.parse(mode), chunk_size
    self._init_segments(segment_length, window)
    # One parameter per field of DCAParams, under the field's name (None: option not in use).
    for name, value in init._asdict().items():
      setattr(self, name, None if value is None else nnx.Param(value.astype(param_dtype)))
    # The convolution over the input starts as the identity (all weight on the current token).
    self._init_short_conv(short_conv, d_model)
    self.out = self._linear(num_heads * head_dim, d_model, rngs)

  def _params(self) -> ops.DCAParams:
    return ops.DCAParams(**{name: None if getattr(self, name) is None else getattr(self, name)[...]
                            for name in ops.DCAParams._fields})

  def _check_cache(self, cache, batch: int) -> None:
    slots, heads, dim = self.window + 1, self.num_heads, self.head_dim   # ring of W + 1 slots
    if self.short_conv:
      _layer.check_cache(cache, DCAConvCache, batch,
                         {"inputs": (batch, self.short_conv - 1, self.d_model)})
      cache = cache.state
    if self.memory is ops.MemoryKind.DELTA:
      _layer.check_cache(cache, ops.DCADeltaState, batch, {
          "keys": (batch, heads, slots, dim), "values": (batch, heads, slots, dim),
          "betas": (batch, heads, slots), "doc_start": (batch,),
          "memory": (batch, heads, dim, dim)})
      return
    _layer.check_cache(cache, ops.DCAState, batch, {
        "keys": (batch, heads, slots, dim), "values": (batch, heads, slots, dim),
        "key_features": (batch, heads, slots, self.num_features), "doc_start": (batch,),
        "memory": (batch, heads, self.num_features, dim + 1)})

  def _weights(self, x):
    dtype = self.dtype or x.dtype
    return ops.compute_weights(self._params(), x.astype(dtype), feature_map_kind=self.feature_map)

  def _project_out(self, o, x_dtype):
    o = o.reshape(o.shape[:-2] + (self.num_heads * self.head_dim,))
    return self.out(o).astype(x_dtype)   # outputs return in the input's dtype

  def _sequence(self, x, reset):
    """[B, T, D] -> [B, T, D] on checked inputs (see `AttentionLayer.__call__`)."""
    history = None
    if self.sequence_axis is not None and self.short_conv > 1:
      history = sequence_parallel.previous_inputs(x, reset, self.short_conv - 1,
                                                  self.sequence_axis)
    weights = self._weights(self._convolve(x, reset, history, self.sequence_axis))
    # x is confined by `__call__` (a non-finite token zeroed, the outputs that see it NaN), so
    # the weights are finite for finite parameters, barring overflow (a huge x, or float16 past
    # 65504): the op's own confinement would be wasted. An overflow gives NaN outputs that may
    # reach beyond the tokens that see it, where the op's confinement would have kept them in.
    o = ops.attention_compress(weights, window=self.window, reset=reset, mode=self.mode,
                               chunk_size=self.chunk_size, rotary_base=self.rotary_base,
                               axis_name=self.sequence_axis, confine_nonfinite=False)
    return self._project_out(o, x.dtype)

  def init_cache(self, batch_size: int, max_length: int):
    """An empty cache (a `DCAState`, or a `DCADeltaState` with memory="delta", in a `DCAConvCache`
    with a short convolution); its size does not depend on `max_length` (kept for a uniform
    interface)."""
    _layer.check_cache_size(batch_size, max_length)
    if self.memory is ops.MemoryKind.DELTA:
      state = ops.init_delta_state(batch_size, self.num_heads, self.head_dim, self.head_dim,
                                   self.window)
    else:
      state = ops.init_state(batch_size, self.num_heads, self.head_dim, self.head_dim,
                             self.num_features, self.window)
    if not self.short_conv:
      return state
    return DCAConvCache(state, jnp.zeros((batch_size, self.short_conv - 1, self.d_model),
                                         jnp.float32))

  def _split_cache(self, cache):
    return (cache.state, cache.inputs) if self.short_conv else (cache, None)

  def _join_cache(self, state, inputs, x):
    if not self.short_conv:
      return state
    keep = self.short_conv - 1
    tail = jnp.concatenate([inputs, x.astype(jnp.float32)], axis=1)
    return DCAConvCache(state, tail[:, tail.shape[1] - keep:])

  def prefill(self, x, cache, reset=None):
    """Runs [B, T, D] continuing from `cache`; returns (y [B, T, D], new cache).

    `reset` (optional bool [B, T]) starts a new document where true: neither the window, the
    memory nor the convolution reaches across it, the cached ones included."""
    _layer.check_sequence(x, self.d_model)
    self._check_cache(cache, x.shape[0])
    self._check_prefill_args(x, reset)
    state, inputs = self._split_cache(cache)
    weights = self._weights(self._convolve(x, reset, history=inputs))
    o, state = ops.attention_compress(weights, window=self.window, state=state, reset=reset,
                                      mode=self.mode, chunk_size=self.chunk_size,
                                      rotary_base=self.rotary_base, return_state=True)
    return self._project_out(o, x.dtype), self._join_cache(state, inputs, x)

  def decode_step(self, x_t, cache, reset=None):
    """One token: x_t [B, D] -> (y_t [B, D], new cache), O(W (K + V) + F V) work, any context.

    `reset` (optional bool [B]) starts a new document at this token in the rows where true."""
    _layer.check_token(x_t, self.d_model)
    self._check_cache(cache, x_t.shape[0])
    _checks.check_step_reset(reset, x_t.shape[0])
    state, inputs = self._split_cache(cache)
    conv_reset = None if reset is None else reset[:, None]
    weights = self._weights(self._convolve(x_t[:, None], conv_reset, history=inputs)[:, 0])
    o, state = ops.memory_state_update(state, weights, rotary_base=self.rotary_base, reset=reset)
    return self._project_out(o, x_t.dtype), self._join_cache(state, inputs, x_t[:, None])
