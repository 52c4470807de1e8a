"""Shared pieces of the attention layers in `dca_jax.nn`: input checks, head reshapes, a base class.

Every layer (softmax, sliding window, linear, gated linear, DCA) has the same interface:

    layer = Layer(d_model, num_heads, *, rngs, dtype=None, param_dtype=jnp.float32, **options)
    y = layer(x, reset=None)                       # x, y: [B, T, d_model]
    cache = layer.init_cache(batch_size, max_length)
    y, cache = layer.prefill(x, cache)             # continues from the cache
    y_t, cache = layer.decode_step(x_t, cache)     # x_t, y_t: [B, d_model]

The cache is an explicit pytree (a `typing.NamedTuple`, the one pytree style of the package) of
float32 states and an int32 position counter, passed in and returned, never stored on the module: the module only holds
parameters, so it can be split once (`nnx.split`) and its state closed over by `jax.lax.scan`:

    graphdef, params = nnx.split(layer)

    def step(cache, x_t):                         # inside jax.jit / jax.lax.scan
      y_t, cache = nnx.merge(graphdef, params).decode_step(x_t, cache)
      return cache, y_t

    cache, ys = jax.lax.scan(step, layer.init_cache(B, L), xs)   # xs: [T, B, D], time-major

or jit the bound call directly: `nnx.jit(lambda m, x_t, c: m.decode_step(x_t, c))`, which
traces once per layer configuration and shape (the cache position is an array, not a Python
int). Checks that need values (the softmax cache overflow) run only on concrete caches.

Notation: B batch, T time, D = d_model, H heads, K key dim, V value dim per head, W window.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.ops import _checks, planner, projection, segments, sequence_parallel
from dca_jax.ops.conv import causal_short_conv


class ConvCache(NamedTuple):
  """Decode cache of a baseline layer with a short convolution (`short_conv` > 0).

  Attributes:
    state: the layer's cache without the convolution (a `KVCache`, `WindowCache` or
      `RecurrentCache`).
    inputs: [B, short_conv - 1, channels] float32, the last short_conv - 1 rows the convolution
      reads (the layer inputs, channels = D, or for `GatedDeltaNet` the projected q, k, v),
      oldest first; zeros before the first token.
  """

  state: Any
  inputs: jax.Array

  @property
  def position(self) -> jax.Array:
    """int32 scalar, the number of tokens seen (as every layer's cache has)."""
    return self.state.position


def check_short_conv(short_conv: Any) -> None:
  """Checks the `short_conv` option: an integer >= 0 (0: no convolution).

  Raises:
    ValueError: naming `short_conv`.
  """
  if not isinstance(short_conv, int) or isinstance(short_conv, bool) or short_conv < 0:
    raise ValueError(f"short_conv must be an integer >= 0 (0: no convolution), got {short_conv!r}.")


def check_heads(d_model: Any, num_heads: Any) -> None:
  """Checks that d_model and num_heads are integers >= 1 and that num_heads divides d_model.

  Raises:
    ValueError: naming `d_model` or `num_heads`.
  """
  _checks.check_positive_int("d_model", d_model)
  _checks.check_positive_int("num_heads", num_heads)
  if d_model % num_heads:
    raise ValueError(
        f"num_heads must divide d_model, got num_heads = {num_heads} and d_model = {d_model}.")


def check_sequence(x: Any, d_model: int, name: str = "x") -> None:
  """Checks that `x` is a floating [B, T, d_model] array with T >= 1.

  Raises:
    TypeError: `x` is not an array or not floating.
    ValueError: wrong rank, T = 0 or a last dim other than d_model.
  """
  _checks.check_array(name, x, 3)
  if x.shape[-1] != d_model:
    raise ValueError(
        f"{name} must have shape [B, T, d_model] with d_model = {d_model}, got shape "
        f"{tuple(x.shape)} (expected last dim {d_model}, got {x.shape[-1]}).")
  if x.shape[1] < 1:
    raise ValueError(f"{name} must have at least one token (T >= 1), got shape {tuple(x.shape)}.")


def check_token(x_t: Any, d_model: int, name: str = "x_t") -> None:
  """Checks that `x_t` is a floating [B, d_model] array (one token per batch row).

  Raises:
    TypeError: `x_t` is not an array or not floating.
    ValueError: wrong rank or a last dim other than d_model.
  """
  _checks.check_array(name, x_t, 2)
  if x_t.shape[-1] != d_model:
    raise ValueError(
        f"{name} must have shape [B, d_model] with d_model = {d_model}, got shape "
        f"{tuple(x_t.shape)} (expected last dim {d_model}, got {x_t.shape[-1]}).")


def check_cache_size(batch_size: Any, max_length: Any) -> None:
  """Checks the arguments of `init_cache`: two integers >= 1."""
  _checks.check_positive_int("batch_size", batch_size)
  _checks.check_positive_int("max_length", max_length)


def check_cache(cache: Any, cache_type: type, batch: int,
                shapes: Mapping[str, tuple[int | None, ...]]) -> None:
  """Checks that `cache` was made by `init_cache` of a matching layer for a batch of `batch` rows.

  Args:
    cache: the cache received.
    cache_type: the class `init_cache` returns.
    batch: B of the input.
    shapes: for each array field of the cache, its expected shape; the first entry is ignored (it
      is checked against `batch`) and None entries match anything (e.g. max_length).

  Raises:
    TypeError: `cache` is not a `cache_type`.
    ValueError: naming `cache`, when its batch size or another dim does not match.
  """
  if not isinstance(cache, cache_type):
    raise TypeError(
        f"cache must be a {cache_type.__name__} (from init_cache), got {type(cache).__name__}.")
  for field, expected in shapes.items():
    got = tuple(getattr(cache, field).shape)
    if got[0] != batch:
      raise ValueError(
          f"cache has batch size {got[0]} (cache.{field} shape {got}), but the input has batch "
          f"size {batch}: build the cache with init_cache({batch}, max_length).")
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got[1:], expected[1:])):
      shown = tuple("*" if e is None else e for e in expected)
      raise ValueError(
          f"cache.{field} has shape {got}, expected {shown}: the cache was made by a layer with "
          f"another configuration.")


def key_width(d_model: int, num_heads: int, expand_k: Any) -> int:
  """H K = d_model * expand_k, the total key width of a layer with narrower keys than values.

  Raises:
    ValueError: naming `expand_k`, when d_model * expand_k is not a positive multiple of
      num_heads.
  """
  width = d_model * expand_k
  if width != int(width) or int(width) < num_heads or int(width) % num_heads:
    raise ValueError(
        f"expand_k must make d_model * expand_k a positive multiple of num_heads, got "
        f"expand_k = {expand_k} (d_model * expand_k = {width}, num_heads = {num_heads}).")
  return int(width)


def check_rotary_head_dim(d_model: int, num_heads: int, head_dim: int) -> None:
  """Checks that the head dim is even, as rotary positions rotate pairs of channels.

  Raises:
    ValueError: an odd head dim.
  """
  if head_dim % 2:
    raise ValueError(
        f"d_model / num_heads must be even for rotary positions, got d_model = {d_model} and "
        f"num_heads = {num_heads} (head dim {head_dim}).")


def next_doc_start(doc_start: jax.Array, position: jax.Array, reset: jax.Array | None) -> jax.Array:
  """Where each row's current document starts after a chunk at `position` with `reset` [B, T].

  Args:
    doc_start: int32 [B], the absolute start positions before the chunk.
    position: int32 scalar, the absolute position of the chunk's first token.
    reset: optional bool [B, T] of the chunk.

  Returns:
    int32 [B]: position + the index of the row's last reset in the chunk, or doc_start if none.
  """
  if reset is None:
    return doc_start
  last = jnp.max(jnp.where(reset, jnp.arange(reset.shape[1], dtype=jnp.int32), -1), axis=1)
  return jnp.where(last >= 0, position + last, doc_start)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[..., H * K] -> [..., H, K]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """[..., H, K] -> [..., H * K]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class AttentionLayer(nnx.Module):
  """Base of the attention layers: stores the shared configuration, checks inputs, decodes.

  Subclasses implement `_sequence(x, reset)` (the body of `__call__`, after the input checks) or
  override `__call__`, and `init_cache(batch_size, max_length)` and `prefill(x, cache)`;
  `decode_step` is a prefill of one token unless a subclass has a faster path.

  Constructor arguments shared by every layer (Shapes: x [B, T, D] -> [B, T, D]; reset [B, T]
  bool):
    d_model: D.
    num_heads: H, must divide D.
    rngs: parameter initialisation keys.
    dtype: compute dtype of the projections (None: promote inputs and parameters).
    param_dtype: parameter dtype.

  Attributes:
    d_model: D, the model width (input and output features).
    num_heads: H.
    head_dim: D // H.
    dtype: compute dtype of the projections (None: promote inputs and parameters).
    param_dtype: dtype of the parameters.
  """

  # Names of parameters that weight decay must not touch (see `registry.NO_WEIGHT_DECAY`).
  no_weight_decay: frozenset[str] = frozenset()
  # Set by the layers whose cache has a constant size (`_init_segments`); None: one pass.
  segment_length: Any = None
  sequence_axis: Any = None

  def __init__(self, d_model: int, num_heads: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    check_heads(d_model, num_heads)
    self.d_model = int(d_model)
    self.num_heads = int(num_heads)
    self.head_dim = self.d_model // self.num_heads
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.short_conv = 0   # no convolution unless `_init_short_conv` sets one up

  def _init_segments(self, segment_length: Any, window: int = 1) -> None:
    """Checks and keeps the `segment_length` option of a layer with a constant-size cache:
    "auto", None, or an integer >= `window` (the layer's window; 1 without one)."""
    if segment_length is not None and segment_length != "auto":
      _checks.check_positive_int("segment_length", segment_length)
      if segment_length < window:
        raise ValueError(f"segment_length must be \"auto\", None or an integer >= window = "
                         f"{window}, got {segment_length}.")
    self.segment_length = segment_length
    self._segment_window = int(window)

  def _segment(self, time: int) -> int | None:
    """The segment length L_seg of a call over `time` tokens (None: one pass, see `__call__`)."""
    if self.sequence_axis is not None or self.segment_length is None:
      return None
    if self.segment_length == "auto":
      segment = planner.segment_length(time, window=self._segment_window)
    else:
      segment = self.segment_length
    return segment if segment is not None and time > segment else None

  def _segmented(self, x: jax.Array, reset: jax.Array | None, segment: int) -> jax.Array:
    """`_sequence` as a `jax.lax.scan` over segments of `segment` tokens, each continuing the
    previous one's cache (`prefill`); the tokens after the last whole segment take one more
    call."""
    batch, time, d_model = x.shape
    whole = time - time % segment

    def to_segments(a):   # [B, whole, ...] -> [N, B, L_seg, ...]
      return jnp.swapaxes(a[:, :whole].reshape((batch, whole // segment, segment) + a.shape[2:]),
                          0, 1)

    def body(cache, inputs):
      x_seg, reset_seg = inputs
      y, cache = self.prefill(x_seg, cache, reset_seg)
      return cache, y

    cache, ys = jax.lax.scan(body, self.init_cache(batch, time),
                             (to_segments(x), None if reset is None else to_segments(reset)))
    y = jnp.swapaxes(ys, 0, 1).reshape(batch, whole, d_model)
    if whole == time:
      return y
    rest, _ = self.prefill(x[:, whole:], cache, None if reset is None else reset[:, whole:])
    return jnp.concatenate([y, rest], axis=1)

  def _init_short_conv(self, short_conv: Any, channels: int) -> None:
    """Sets up the optional short causal convolution over `channels` rows (width `short_conv`).

    The kernel [short_conv, channels] starts as the identity (all weight on the current token),
    so a layer with the convolution computes at initialisation what it computes without it.
    Raises ValueError naming `short_conv` when it is not an integer >= 0.
    """
    check_short_conv(short_conv)
    self.short_conv = int(short_conv)
    self.conv_channels = int(channels)
    self.conv = (nnx.Param(jnp.zeros((short_conv, channels), self.param_dtype).at[-1].set(1.0))
                 if short_conv else None)

  def _convolve(self, u: jax.Array, reset: jax.Array | None = None,
                history: jax.Array | None = None, axis_name: Any = None) -> jax.Array:
    """u [B, T, channels] through the short convolution (`causal_short_conv`), or u without one.

    Inside `jax.shard_map` (T sharded over `axis_name`, or the batch over another axis) the
    replicated kernel enters the convolution's custom_vjp as a per-device value, so its
    gradient is summed over the devices outside it.
    """
    if not self.short_conv:
      return u
    kernel = self.conv[...].astype(self.dtype or u.dtype)
    if axis_name is not None:
      kernel = sequence_parallel.varying(kernel, axis_name, like=u)
    else:   # inside a shard_map over the batch only (data parallel), u may vary too
      kernel = sequence_parallel.match_varying(kernel, u)
    return causal_short_conv(u, kernel, reset, history)

  def _shard_history(self, rows: jax.Array, reset: jax.Array | None,
                     axis_name: Any) -> jax.Array | None:
    """The convolution's history at a shard boundary when T is sharded over `axis_name`: the
    previous shard's last short_conv - 1 rows (`sequence_parallel.previous_inputs`); None
    unsharded or without a convolution of width > 1."""
    if axis_name is None or self.short_conv <= 1:
      return None
    return sequence_parallel.previous_inputs(rows, reset, self.short_conv - 1, axis_name)

  def _with_conv_cache(self, cache: Any, batch_size: int) -> Any:
    """`init_cache`'s result: the layer's cache, wrapped in a `ConvCache` with a convolution."""
    if not self.short_conv:
      return cache
    return ConvCache(cache, jnp.zeros((batch_size, self.short_conv - 1, self.conv_channels),
                                      jnp.float32))

  def _split_conv_cache(self, cache: Any, batch: int) -> tuple[Any, jax.Array | None]:
    """(the layer's own cache, the convolution's history or None), checking the wrapper.

    Raises:
      TypeError, ValueError: as `check_cache`, for a cache that is not this layer's `ConvCache`.
    """
    if not self.short_conv:
      return cache, None
    check_cache(cache, ConvCache, batch,
                {"inputs": (batch, self.short_conv - 1, self.conv_channels)})
    return cache.state, cache.inputs

  def _join_conv_cache(self, state: Any, inputs: jax.Array | None, u: jax.Array) -> Any:
    """The new cache: `state` and, with a convolution, the last short_conv - 1 rows of
    [inputs, u]."""
    if not self.short_conv:
      return state
    tail = jnp.concatenate([inputs, u.astype(jnp.float32)], axis=1)
    return ConvCache(state, tail[:, tail.shape[1] - (self.short_conv - 1):])

  def _linear(self, in_features: int, out_features: int, rngs: nnx.Rngs, *,
              use_bias: bool = False) -> nnx.Linear:
    """A projection in the layer's dtypes (bias-free unless asked)."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, dot_general=projection.dot_general,
                      rngs=rngs)

  def _check_call(self, x: Any, reset: Any = None) -> None:
    """Checks the arguments of `__call__`."""
    check_sequence(x, self.d_model)
    _checks.check_reset(reset, x.shape[0], x.shape[1])

  def _check_prefill(self, x: Any, cache: Any, cache_type: type,
                     shapes: Mapping[str, tuple[int | None, ...]]) -> tuple[Any, jax.Array | None]:
    """Checks the arguments of `prefill`: x as in `check_sequence`, cache as in `check_cache`
    (inside its `ConvCache` with a convolution).

    Returns:
      (the layer's own cache, the convolution's history or None), see `_split_conv_cache`.
    """
    check_sequence(x, self.d_model)
    state, inputs = self._split_conv_cache(cache, x.shape[0])
    check_cache(state, cache_type, x.shape[0], shapes)
    return state, inputs

  def _output(self, o: jax.Array, dtype: Any) -> jax.Array:
    """[B, T, H, V] head outputs -> out_proj(concat_heads(o)) [B, T, D] in `dtype`."""
    return self.out_proj(merge_heads(o)).astype(dtype)

  # How many of the most recent tokens (itself included) a token's output can depend on, or None
  # for the whole document so far: the reach of a non-finite input (see `__call__`).
  def _reach(self) -> int | None:
    return None

  def __call__(self, x: jax.Array, *, reset: jax.Array | None = None) -> jax.Array:
    """The layer over x.

    A non-finite entry of x makes NaN exactly the outputs that can see its token (later tokens
    of its document, within the layer's reach); every other output, and every gradient with
    respect to the parameters and to the other tokens, stays what it is without it. (The token
    is replaced by zeros before any computation, so no 0 x NaN reaches a gradient.)

    Args:
      x: [B, T, D] floating.
      reset: optional bool [B, T]; true where a new document starts (no attention across it).

    Returns:
      [B, T, D] in x's dtype.

    Raises:
      TypeError, ValueError: x not a floating [B, T, D] array, or a bad reset.
    """
    self._check_call(x, reset)
    bad = segments.nonfinite(x)                                            # [B, T]
    x, = segments.zero_where(bad, x)
    segment = self._segment(x.shape[1])
    y = self._sequence(x, reset) if segment is None else self._segmented(x, reset, segment)
    doc = None if reset is None else segments.document_ids(reset)
    poisoned = segments.sees_nonfinite(bad, doc, window=self._reach())
    return jnp.where(poisoned[..., None], jnp.nan, y)

  def _sequence(self, x: jax.Array, reset: jax.Array | None) -> jax.Array:
    """`__call__` on checked inputs."""
    raise NotImplementedError

  def _check_prefill_args(self, x: Any, reset: Any) -> None:
    """Checks `prefill`'s optional reset: bool [B, T] like x's first two dims, and that T is
    not sharded: inside `jax.shard_map` over `sequence_axis`, each shard would prefill its slice
    from the same cache (a wrong result), so that is an error."""
    _checks.check_reset(reset, x.shape[0], x.shape[1])
    if self.sequence_axis is not None:
      try:
        shards = jax.lax.axis_size(self.sequence_axis)
      except NameError:
        return                    # not under shard_map over that axis: one device, as usual
      raise NotImplementedError(
          f"prefill inside jax.shard_map over sequence_axis={self.sequence_axis!r} ({shards} "
          f"shards) is not implemented (each shard would continue the same cache). Call the "
          f"layer without a cache there, or prefill on one device; for DCA, "
          f"attention_compress(..., axis_name=..., state=..., return_state=True) is a sharded "
          f"prefill.")

  def decode_step(self, x_t: jax.Array, cache: Any,
                  reset: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Processes one token per batch row, continuing from `cache`.

    Equivalent to `prefill(x_t[:, None], cache, reset[:, None])` with the time axis removed.

    Args:
      x_t: [B, D] the current token.
      cache: the cache from `init_cache`, `prefill` or a previous `decode_step`.
      reset: optional bool [B]; true in a row where a new document starts at this token (nothing
        cached for that row is seen any more), so packed prompts decode per document.

    Returns:
      (y_t [B, D] in x_t's dtype, the updated cache).

    Raises:
      TypeError, ValueError: as `prefill`, when x_t is not [B, D] or reset is not bool [B].
    """
    check_token(x_t, self.d_model)
    _checks.check_step_reset(reset, x_t.shape[0])
    y, cache = self.prefill(x_t[:, None, :], cache, None if reset is None else reset[:, None])
    return y[:, 0], cache
