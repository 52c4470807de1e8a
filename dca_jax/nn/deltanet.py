"""`GatedDeltaNet`: a matrix memory that overwrites associations, as an attention layer.

The gated delta rule (`dca_jax.ops.delta_rule_attention`) between the projections of Gated
DeltaNet (Yang, Kautz and Hatamizadeh 2025): a short convolution and L2-normalised queries and
keys in front, a per-head RMS norm and a SiLU output gate behind. Like the linear attention
layers it decodes with a constant-size state (plus the convolution's last rows).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import _layer
from dca_jax.nn.linear import _RecurrentAttention
from dca_jax.ops import _checks
from dca_jax.ops.dca_params import half_life_bias
from dca_jax.ops.delta_rule import (delta_rule_attention, delta_rule_plans, l2_normalize,
                                   run_delta_rule)
from dca_jax.ops.planner import EnginePlan, Mode


class GatedDeltaNet(_RecurrentAttention):
  r"""Gated DeltaNet: the gated delta rule with a short convolution, an output norm and gate.

  Per head, with K = expand_k D / H and V = D / H:

      [q_t, k_t, v_t] = silu(conv([x_t W_q, x_t W_k, x_t W_v]))  (causal depthwise, short_conv taps)
      q^_t = q_t / |q_t| / sqrt(K),   k^_t = k_t / |k_t|             (L2 per head)
      beta_t = sigmoid(x_t W_b),      log a_t = -softplus(x_t W_a + b_a)   (one per head)
      S_t = a_t (I - beta_t k^_t k^_t^T) S_{t-1} + beta_t k^_t v_t^T,      o_t = S_t^T q^_t
      y_t = W_o [ RMSNorm(o_t) * silu(x_t W_g) ].

  The decay is DCA's parametrisation (`dca_jax.ops.half_life_bias`): W_a starts at zero and the
  biases b_a give the heads half-lives spread geometrically from `min_half_life` to
  `min_half_life * max_half_life_ratio` tokens; each rate then learns to depend on the input
  (Mamba-2's -exp(A) softplus(x W + dt) is the same family with one more scale per head). The
  convolution kernel starts as the identity. RMSNorm is per head over V with one scale vector
  shared by the heads; W_b, W_a are D x H, W_g is D x D. With expand_k = 0.5 (default) keys are
  half as wide as values (Gated DeltaNet's 1 : 2) and the parameter count is
  4 D^2 + 2 D H + H + V + 2 D short_conv, about softmax attention's 4 D^2.

  Everything after the projections runs in float32; the state S is float32 [B, H, K, V] and
  constant in size. A `reset` drops the state and the convolution's view of the past. Decoding
  is the recurrent one-step update whatever `mode`.

  Shapes and args d_model, num_heads, rngs, dtype, param_dtype: see `AttentionLayer`.

  Args:
    expand_k: total key width as a fraction of D; D * expand_k must be a multiple of H.
    short_conv: the width of the causal depthwise convolution over the projected q, k, v
      (default 4; 0: none, then the cache is a `RecurrentCache`, else a `ConvCache` of one and
      the last short_conv - 1 projected rows).
    segment_length: "auto" (default), an integer L_seg (>= the window, if any), or None: a call
      over more than L_seg tokens runs as a scan over segments continuing the cache
      (`AttentionLayer._segmented`; "auto": `dca_jax.ops.segment_length`, one pass on every
      backend today, where it measured faster; None: always one pass; an integer bounds the
      memory of a long call).
    sequence_axis: None, or the mesh axis that T is sharded over when the layer is called inside
      `jax.shard_map` (x and reset are then this shard's slice): the convolution's last
      short_conv - 1 projected rows come from the previous shard by `ppermute`, the state as in
      `delta_rule_attention(..., axis_name=)`. Calls only (prefill and decoding are not
      sharded).
    min_half_life: the shortest initial half-life of a head, in tokens (> 0).
    max_half_life_ratio: the longest initial half-life over the shortest (>= 1).
    norm_eps: epsilon of the output RMSNorm.
    mode: the delta rule's form for sequences ("auto", "recurrent", "associative", "chunked",
      "quadratic"; see `delta_rule_attention`).
    chunk_size: C of the chunked form (None: the planner's).

  Raises:
    ValueError: num_heads does not divide d_model, a bad expand_k, short_conv, min_half_life,
      max_half_life_ratio, mode or chunk_size (each named).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = GatedDeltaNet(32, 4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    >>> y, cache = layer.prefill(x, layer.init_cache(2, max_length=10**6))
    >>> y.shape, cache.state.state.shape, cache.inputs.shape
    ((2, 10, 32), (2, 4, 4, 8), (2, 3, 64))

  References:
    Yang, Kautz and Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
    (ICLR 2025), the gated delta rule and the layer (short convolutions with SiLU, L2-normalised
    q and k, sigmoid beta, Mamba-2-style decay, output norm and gate); Dao and Gu 2024
    (Mamba-2) for the decay.
  """

  no_weight_decay = frozenset({"decay", "decay_bias"})

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, expand_k: float = 0.5, short_conv: int = 4,
               min_half_life: float = 16.0, max_half_life_ratio: float = 16.0,
               norm_eps: float = 1e-5, mode: Mode | str = "auto", chunk_size: int | None = None,
               segment_length: int | str | None = "auto", sequence_axis: Any = None):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    self.sequence_axis = sequence_axis
    self._init_segments(segment_length)
    key_width = _layer.key_width(d_model, num_heads, expand_k)
    if isinstance(min_half_life, bool) or not isinstance(min_half_life, (int, float)) or not (
        min_half_life > 0 and math.isfinite(min_half_life)):
      raise ValueError(f"min_half_life must be a finite number > 0 (tokens), got {min_half_life!r}.")
    if isinstance(max_half_life_ratio, bool) or not isinstance(max_half_life_ratio, (int, float)) \
        or not (1 <= max_half_life_ratio < math.inf):
      raise ValueError(f"max_half_life_ratio must be a finite number >= 1, got "
                       f"{max_half_life_ratio!r}.")
    self.mode = Mode.parse(mode)
    _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
    self.chunk_size = chunk_size
    self.key_dim = key_width // num_heads
    self.q_proj = self._linear(d_model, key_width, rngs)
    self.k_proj = self._linear(d_model, key_width, rngs)
    self.v_proj = self._linear(d_model, d_model, rngs)
    self._init_short_conv(short_conv, 2 * key_width + d_model)
    self.beta_proj = self._linear(d_model, num_heads, rngs)
    self.decay = nnx.Param(jnp.zeros((d_model, num_heads), param_dtype))
    self.decay_bias = nnx.Param(
        half_life_bias(num_heads, min_half_life, max_half_life_ratio).astype(param_dtype))
    self.out_gate = self._linear(d_model, d_model, rngs)
    self.norm = nnx.RMSNorm(self.head_dim, epsilon=norm_eps, dtype=jnp.float32,
                            param_dtype=param_dtype, rngs=rngs)
    self.out_proj = self._linear(d_model, d_model, rngs)

  def _plans(self, time: int) -> tuple[EnginePlan, EnginePlan]:
    if time == 1:   # a decoding step: one recurrent update, whatever the sequence form
      return EnginePlan(Mode.RECURRENT), EnginePlan(Mode.RECURRENT)
    return delta_rule_plans(time, mode=self.mode, chunk_size=self.chunk_size)

  def _forward(self, x: jax.Array, state: jax.Array | None, reset: jax.Array | None,
               history: jax.Array | None, axis_name: Any = None, guard: bool = True
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """y [B, T, D], the final [B, H, K, V] state and the projected rows [B, T, 2 H K + D]."""
    heads, f32 = self.num_heads, jnp.float32
    width = heads * self.key_dim
    rows = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
    if axis_name is not None:
      history = self._shard_history(rows, reset, axis_name)
    mixed = jax.nn.silu(self._convolve(rows, reset, history, axis_name))
    q, k, v = (_layer.split_heads(part, heads).astype(f32)
               for part in jnp.split(mixed, [width, 2 * width], axis=-1))
    q = l2_normalize(q) / math.sqrt(self.key_dim)
    k = l2_normalize(k)
    x32 = x.astype(f32)
    beta = jax.nn.sigmoid(self.beta_proj(x).astype(f32))                       # [B, T, H]
    rate = x32 @ self.decay[...].astype(f32) + self.decay_bias[...].astype(f32)
    if axis_name is not None:
      o, final = delta_rule_attention(q, k, v, beta, -jax.nn.softplus(rate), initial_state=state,
                                      reset=reset, mode=self.mode, chunk_size=self.chunk_size,
                                      return_final_state=True, axis_name=axis_name)
    else:
      o, final = run_delta_rule(self._plans(x.shape[1]), q, k, v, beta, -jax.nn.softplus(rate),
                                initial_state=state, reset=reset, guard=guard)
    o = _layer.merge_heads(self.norm(o))
    gate = self.out_gate(x)
    o = o.astype(gate.dtype) * jax.nn.silu(gate)
    return self.out_proj(o).astype(x.dtype), final, rows

  def _state_shape(self, batch_size: Any) -> tuple[Any, ...]:
    """[B, H, K, V]."""
    return (batch_size, self.num_heads, self.key_dim, self.head_dim)
