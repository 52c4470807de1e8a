"""`DCAttention`: the Flax NNX layer of Dynamic Compression Attention.

The layer owns the parameters and wires the pure functions of `dca_jax.ops.dca` together:
`compute_weights` -> `attention_compress` (whole sequence, prefill) or `memory_state_update`
(one decoding step) -> output projection. Its cache is a `DCAState` whose size depends on the
window, heads and feature dimension, never on the context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import _layer
from dca_jax.ops import _checks
from dca_jax.ops import dca as dca_ops
from dca_jax.ops.feature_maps import FeatureMap, feature_dim as _feature_dim
from dca_jax.ops.planner import Mode


class DCAttention(_layer.AttentionLayer):
  """Dynamic Compression Attention: exact softmax over the last `window` tokens + compressed memory.

  Args:
    d_model: D, model width.
    num_heads: H; must divide D (head dim K = V = D / H).
    rngs: `nnx.Rngs` for the initialisation.
    window: W, tokens kept exactly (default 64).
    feature_dim: P, the size of the projected queries/keys fed to the feature map (default 16;
      the Taylor map turns them into F = 1 + P + P (P + 1) / 2 = 153 features).
    feature_map: "taylor" (default) or "elu".
    max_half_life_ratio: heads are initialised with half-lives spread from W to this times W.
    rotary_base: rotary base for the window (None: no positions).
    mode: engine form for the compressed memory ("auto" follows `adaptive_scale`).
    chunk_size: engine chunk size (None: the planner's).
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

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, window: int = 64,
               feature_dim: int = 16, feature_map: FeatureMap | str = "taylor",
               max_half_life_ratio: float = 16.0,
               rotary_base: float | None = 10000.0, mode: Mode | str = "auto",
               chunk_size: int | None = None, dtype=None, param_dtype=jnp.float32):
    super().__init__(d_model, num_heads, dtype=dtype, param_dtype=param_dtype)
    _checks.check_positive_int("window", window)
    _checks.check_positive_int("feature_dim", feature_dim)
    head_dim = self.head_dim
    self.window, self.rotary_base = window, rotary_base
    self.feature_map = FeatureMap.parse(feature_map)
    self.num_features = _feature_dim(self.feature_map, feature_dim)
    self.mode, self.chunk_size = Mode.parse(mode), chunk_size
    init = dca_ops.init_params(rngs.params(), d_model, num_heads, window=window, head_dim=head_dim,
                               feature_dim=feature_dim, max_half_life_ratio=max_half_life_ratio)
    self.query = nnx.Param(init.query.astype(param_dtype))
    self.key = nnx.Param(init.key.astype(param_dtype))
    self.value = nnx.Param(init.value.astype(param_dtype))
    self.feature = nnx.Param(init.feature.astype(param_dtype))
    self.decay = nnx.Param(init.decay.astype(param_dtype))
    self.decay_bias = nnx.Param(init.decay_bias.astype(param_dtype))
    self.out = self._linear(num_heads * head_dim, d_model, rngs)

  def _params(self) -> dca_ops.DCAParams:
    return dca_ops.DCAParams(self.query[...], self.key[...], self.value[...], self.feature[...],
                             self.decay[...], self.decay_bias[...])

  def _check_cache(self, cache, batch: int) -> None:
    window, heads, dim = self.window, self.num_heads, self.head_dim
    _layer.check_cache(cache, dca_ops.DCAState, batch, {
        "keys": (batch, window, heads, dim), "values": (batch, window, heads, dim),
        "key_features": (batch, window, heads, self.num_features), "doc": (batch, window),
        "memory": (batch, heads, self.num_features, dim + 1)})

  def _weights(self, x):
    dtype = self.dtype or x.dtype
    return dca_ops.compute_weights(self._params(), x.astype(dtype), feature_map_kind=self.feature_map)

  def _project_out(self, o, x_dtype):
    o = o.reshape(o.shape[:-2] + (self.num_heads * self.head_dim,))
    return self.out(o).astype(self.dtype or x_dtype)

  def __call__(self, x, *, reset=None):
    """[B, T, D] -> [B, T, D]; `reset` optional bool [B, T] (documents packed in one row)."""
    self._check_call(x, reset)
    o = dca_ops.attention_compress(self._weights(x), window=self.window, reset=reset, mode=self.mode,
                                   chunk_size=self.chunk_size, rotary_base=self.rotary_base)
    return self._project_out(o, x.dtype)

  def init_cache(self, batch_size: int, max_length: int) -> dca_ops.DCAState:
    """An empty cache; its size does not depend on `max_length` (kept for a uniform interface)."""
    _layer.check_cache_size(batch_size, max_length)
    return dca_ops.init_state(batch_size, self.num_heads, self.head_dim, self.head_dim,
                              self.num_features, self.window)

  def prefill(self, x, cache):
    """Runs [B, T, D] continuing from `cache`; returns (y [B, T, D], new cache)."""
    _layer.check_sequence(x, self.d_model)
    self._check_cache(cache, x.shape[0])
    o, cache = dca_ops.attention_compress(self._weights(x), window=self.window, state=cache,
                                          mode=self.mode, chunk_size=self.chunk_size,
                                          rotary_base=self.rotary_base, return_state=True)
    return self._project_out(o, x.dtype), cache

  def decode_step(self, x_t, cache):
    """One token: x_t [B, D] -> (y_t [B, D], new cache), O(W K + F V) work whatever the context."""
    _layer.check_token(x_t, self.d_model)
    self._check_cache(cache, x_t.shape[0])
    o, cache = dca_ops.memory_state_update(cache, self._weights(x_t), rotary_base=self.rotary_base)
    return self._project_out(o, x_t.dtype), cache
