"""Linear attention layers: a fixed-size matrix state instead of a growing KV cache.

`LinearAttention` (Katharopoulos et al. 2020) never forgets; `GatedLinearAttention` (Yang et
al. 2023) forgets at a data-dependent rate per key channel. Both run on the gated linear
attention engine (`dca_jax.ops.gated_linear_attention`) and decode in O(1) memory and time per
token: DCA's compressed memory on its own.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import _layer
from dca_jax.ops.feature_maps import elu_features
from dca_jax.ops.gla import gated_linear_attention, run_engine
from dca_jax.ops.planner import engine_plans
from dca_jax.ops.rowwise import scale_rows


class RecurrentCache(NamedTuple):
  """Decode cache of the linear attention layers: the matrix state after the last token.

  Attributes:
    state: [B, H, K, V'] float32. For `GatedLinearAttention` V' = V and this is S_t; for
      `LinearAttention` V' = V + 1: columns :V hold S_t and column V the normaliser z_t.
    position: int32 scalar, the number of tokens seen (kept for a uniform interface; the state
      itself is position-free).
  """

  state: jax.Array
  position: jax.Array


class _RecurrentAttention(_layer.AttentionLayer):
  """Base of the linear attention layers: the cache is one state of shape `_state_shape` (and,
  with a short convolution, the rows it reads: a `ConvCache`).

  Subclasses set up their parameters and implement `_state_shape(batch_size)` and
  `_forward(x, state, reset, history, axis_name=None, guard=True) -> (y, final_state,
  conv_rows)`, where `history` is the convolution's cached rows (None: none yet, or no
  convolution), `conv_rows` [B, T, C] the rows of x's tokens it reads (cached for the next call)
  and `guard` is the engine's confinement of non-finite inputs (off when `__call__` has confined
  x already; the sharded engine, with `axis_name`, confines whatever `guard` says).
  """

  def _state_shape(self, batch_size: Any) -> tuple[Any, ...]:
    raise NotImplementedError

  sequence_axis: Any = None   # set by subclasses that take the option

  def _forward(self, x: jax.Array, state: jax.Array | None, reset: jax.Array | None,
               history: jax.Array | None, axis_name: Any = None, guard: bool = True
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    raise NotImplementedError

  def _sequence(self, x: jax.Array, reset: jax.Array | None) -> jax.Array:
    # Sharded (inside jax.shard_map, T over `sequence_axis`): the convolution's history comes
    # from the previous shard and the engine carries the state across shards (LASP-2 style).
    # x is confined by `__call__`, so the engine's own confinement of non-finite inputs is
    # skipped (`run_engine(guard=False)`).
    return self._forward(x, None, reset, None, self.sequence_axis, guard=False)[0]

  @staticmethod
  def _engine(q, k, v, log_decay, state, reset, axis_name=None, guard=True):
    """The engine on the layer's own (checked) projections: planned once, not checked again
    (with `axis_name`, the sharded engine `gated_linear_attention(axis_name=)`); `guard` as
    `run_engine`'s."""
    if axis_name is not None:
      return gated_linear_attention(q, k, v, log_decay, initial_state=state, reset=reset,
                                    return_final_state=True, axis_name=axis_name)
    plans = engine_plans(q.shape[1], per_channel_decay=log_decay.ndim == 4)
    return run_engine(plans, q, k, v, log_decay, initial_state=state, reset=reset, guard=guard)

  def init_cache(self, batch_size: int, max_length: int) -> RecurrentCache | _layer.ConvCache:
    """A zero float32 state (see `RecurrentCache`; in a `ConvCache` with a short convolution);
    `max_length` is only validated (the size is constant).

    Raises:
      ValueError: batch_size or max_length not an integer >= 1.
    """
    _layer.check_cache_size(batch_size, max_length)
    cache = RecurrentCache(state=jnp.zeros(self._state_shape(batch_size), jnp.float32),
                           position=jnp.zeros((), jnp.int32))
    return self._with_conv_cache(cache, batch_size)

  def prefill(self, x: jax.Array, cache: RecurrentCache | _layer.ConvCache,
              reset: jax.Array | None = None) -> tuple[jax.Array, RecurrentCache | _layer.ConvCache]:
    """The layer over x continuing from the cached state.

    Args:
      x: [B, T, D] floating.
      cache: a `RecurrentCache` from this layer's `init_cache`, batch size B (a `ConvCache` of
        one with a short convolution).
      reset: optional bool [B, T]; true where a new document starts (the state is dropped there,
        the cached one too when it is at the first token).

    Returns:
      (y [B, T, D] in x's dtype, the updated cache).

    Raises:
      TypeError, ValueError: bad x or reset, or a cache of another batch size or configuration.
    """
    cache, inputs = self._check_prefill(x, cache, RecurrentCache,
                                        {"state": self._state_shape(None)})
    self._check_prefill_args(x, reset)
    y, state, rows = self._forward(x, cache.state, reset, inputs)
    cache = RecurrentCache(state=state, position=cache.position + x.shape[1])
    return y, self._join_conv_cache(cache, inputs, rows)


class LinearAttention(_RecurrentAttention):
  r"""Causal linear attention with the elu + 1 feature map, normalised.

  Per head, with phi = elu + 1 applied to the projections q_t, k_t (K = V = D / H):

      S_t = S_{t-1} + phi(k_t) v_t^T,      z_t = z_{t-1} + phi(k_t),
      o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),      y_t = W_o concat_heads(o_t).

  The numerator and the normaliser come from one engine call: z is S for an extra value column
  of ones, so the engine runs on [v, 1] and the state is [B, H, K, V + 1]. There are no
  positions (the state is a sum). A `reset` drops S and z. Everything after the projections
  runs in float32.

  Shapes and args d_model, num_heads, rngs, dtype, param_dtype: see `AttentionLayer`.

  Args:
    eps: added to the normaliser (which is > 0 since phi > 0).
    short_conv: the width of a causal depthwise convolution over the input of the q, k, v
      projections (DCA's, `causal_short_conv`, initialised as the identity); 0 (default): none.
    segment_length: "auto" (default), an integer L_seg (>= the window, if any), or None: a call
      over more than L_seg tokens runs as a scan over segments continuing the cache
      (`AttentionLayer._segmented`; "auto": `dca_jax.ops.segment_length`, one pass on every
      backend today, where it measured faster; None: always one pass; an integer bounds the
      memory of a long call).
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): the convolution's last
      short_conv - 1 inputs come from the previous shard by `ppermute`, the state as in
      `gated_linear_attention(..., axis_name=)`. Calls only (prefill and decoding are not
      sharded).

  Raises:
    ValueError: num_heads does not divide d_model, either is not an integer >= 1, or short_conv
      is not an integer >= 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = LinearAttention(32, 4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    >>> y, cache = layer.prefill(x, layer.init_cache(2, max_length=10**6))
    >>> y.shape, cache.state.shape
    ((2, 10, 32), (2, 4, 8, 9))

  References:
    Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
    Linear Attention", eqs. (4)-(7) and sec. 3.4 (the recurrent form).
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, eps: float = 1e-6, short_conv: int = 0,
               segment_length: int | str | None = "auto", sequence_axis: Any = None):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    self.sequence_axis = sequence_axis
    self._init_segments(segment_length)
    self.eps = float(eps)
    self._init_short_conv(short_conv, d_model)
    self.q_proj = self._linear(d_model, d_model, rngs)
    self.k_proj = self._linear(d_model, d_model, rngs)
    self.v_proj = self._linear(d_model, d_model, rngs)
    self.out_proj = self._linear(d_model, d_model, rngs)

  def _forward(self, x: jax.Array, state: jax.Array | None, reset: jax.Array | None,
               history: jax.Array | None, axis_name: Any = None, guard: bool = True
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """y [B, T, D], the final [B, H, K, V + 1] state and the convolution's rows (x)."""
    heads, f32 = self.num_heads, jnp.float32
    if axis_name is not None:
      history = self._shard_history(x, reset, axis_name)
    u = self._convolve(x, reset, history, axis_name)
    q = elu_features(_layer.split_heads(self.q_proj(u), heads).astype(f32))
    k = elu_features(_layer.split_heads(self.k_proj(u), heads).astype(f32))
    v = _layer.split_heads(self.v_proj(u), heads).astype(f32)
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    # No forgetting: a log decay of 0, one per head (the engine's fast scalar-decay path).
    log_decay = jnp.zeros(q.shape[:3], f32)
    # mode "auto" for one decode token too: the planner picks the recurrent form for T = 1.
    o, final = self._engine(q, k, v, log_decay, state, reset, axis_name, guard)
    # 1 / (z + eps) through rowwise.scale_rows: its gradient is an einsum, not a slow reduction.
    o = scale_rows(o[..., :-1], 1.0 / (o[..., -1] + self.eps))
    return self._output(o, x.dtype), final, x

  def _state_shape(self, batch_size: Any) -> tuple[Any, ...]:
    """[B, H, K, V + 1]: S and, in the last column, z."""
    return (batch_size, self.num_heads, self.head_dim, self.head_dim + 1)


class GatedLinearAttention(_RecurrentAttention):
  r"""Gated linear attention (GLA): linear attention with data-dependent per-channel forgetting.

  Per head, with q_t, k_t in R^K (K = expand_k D / H) and v_t in R^V (V = D / H):

      alpha_t = sigmoid(x_t W_a W_b + b)^(1/tau)                 (low-rank gate, rank r)
      S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,     o_t = S_t^T q_t / sqrt(K),
      y_t = W_o [ RMSNorm(o_t) * silu(x_t W_r) ].

  i.e. log_decay_t = log_sigmoid(x_t W_a W_b + b) / tau, computed in log space so that it is
  exact however strong the forgetting. RMSNorm is per head over V (one scale vector shared by
  the heads) and the output gate W_r is a full D x D matrix. With GLA's defaults (expand_k =
  0.5, r = 16, tau = 16) the parameter count is 4 D^2 + r (D + D/2) + D/2 + V, about that of
  softmax attention: the query and key projections are half width and pay for the output gate.
  The gate bias starts at 0, so every channel starts with alpha = 2^(-1/16) (a half-life of 16
  tokens) and learns its own rate.

  The state S is float32 [B, H, K, V] and constant in size; a `reset` drops it.

  Shapes and args d_model, num_heads, rngs, dtype, param_dtype: see `AttentionLayer`.

  Args:
    expand_k: total key width as a fraction of D; D * expand_k must be a multiple of H.
    gate_rank: r, the rank of the forget gate's projection.
    gate_temperature: tau >= 1 divides the log gate, pushing decays towards 1 (slow forgetting).
    norm_eps: epsilon of the output RMSNorm.
    short_conv: the width of a causal depthwise convolution over the input of the q, k, v
      projections (DCA's, `causal_short_conv`, initialised as the identity; the gates read the
      input itself); 0 (default): none.
    segment_length: "auto" (default), an integer L_seg (>= the window, if any), or None: a call
      over more than L_seg tokens runs as a scan over segments continuing the cache
      (`AttentionLayer._segmented`; "auto": `dca_jax.ops.segment_length`, one pass on every
      backend today, where it measured faster; None: always one pass; an integer bounds the
      memory of a long call).
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): the convolution's last
      short_conv - 1 inputs come from the previous shard by `ppermute`, the state as in
      `gated_linear_attention(..., axis_name=)`. Calls only (prefill and decoding are not
      sharded).

  Raises:
    ValueError: num_heads does not divide d_model, expand_k gives a key width that is not a
      positive multiple of num_heads, gate_rank < 1, gate_temperature <= 0 or short_conv not an
      integer >= 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = GatedLinearAttention(32, 4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    >>> y, cache = layer.prefill(x, layer.init_cache(2, max_length=10**6))
    >>> y.shape, cache.state.shape
    ((2, 10, 32), (2, 4, 4, 8))

  References:
    Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training",
    sec. 4.4 (the GLA layer: low-rank gate with r = 16 and tau = 16, output norm and swish
    gate, expand_k = 0.5).
  """

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, expand_k: float = 0.5, gate_rank: int = 16,
               gate_temperature: float = 16.0, norm_eps: float = 1e-5, short_conv: int = 0,
               segment_length: int | str | None = "auto", sequence_axis: Any = None):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    self.sequence_axis = sequence_axis
    self._init_segments(segment_length)
    key_width = _layer.key_width(d_model, num_heads, expand_k)
    if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
      raise ValueError(f"gate_rank must be an integer >= 1, got {gate_rank!r}.")
    if not gate_temperature > 0:
      raise ValueError(f"gate_temperature must be > 0, got {gate_temperature!r}.")
    self._init_short_conv(short_conv, d_model)
    self.key_dim = key_width // num_heads
    self.gate_temperature = float(gate_temperature)
    self.q_proj = self._linear(d_model, key_width, rngs)
    self.k_proj = self._linear(d_model, key_width, rngs)
    self.v_proj = self._linear(d_model, d_model, rngs)
    self.gate_down = self._linear(d_model, gate_rank, rngs)
    self.gate_up = self._linear(gate_rank, key_width, rngs, use_bias=True)
    self.out_gate = self._linear(d_model, d_model, rngs)
    self.norm = nnx.RMSNorm(self.head_dim, epsilon=norm_eps, dtype=jnp.float32,
                            param_dtype=param_dtype, rngs=rngs)
    self.out_proj = self._linear(d_model, d_model, rngs)

  def _forward(self, x: jax.Array, state: jax.Array | None, reset: jax.Array | None,
               history: jax.Array | None, axis_name: Any = None, guard: bool = True
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """y [B, T, D], the final [B, H, K, V] state and the convolution's rows (x)."""
    heads, f32 = self.num_heads, jnp.float32
    if axis_name is not None:
      history = self._shard_history(x, reset, axis_name)
    u = self._convolve(x, reset, history, axis_name)
    q = _layer.split_heads(self.q_proj(u), heads).astype(f32) / math.sqrt(self.key_dim)
    k = _layer.split_heads(self.k_proj(u), heads).astype(f32)
    v = _layer.split_heads(self.v_proj(u), heads).astype(f32)
    gate = self.gate_up(self.gate_down(x)).astype(f32)
    log_decay = _layer.split_heads(jax.nn.log_sigmoid(gate), heads) / self.gate_temperature
    o, final = self._engine(q, k, v, log_decay, state, reset, axis_name, guard)
    o = _layer.merge_heads(self.norm(o))
    out_gate = self.out_gate(x)
    o = o.astype(out_gate.dtype) * jax.nn.silu(out_gate)
    return self.out_proj(o).astype(x.dtype), final, x

  def _state_shape(self, batch_size: Any) -> tuple[Any, ...]:
    """[B, H, K, V]."""
    return (batch_size, self.num_heads, self.key_dim, self.head_dim)
