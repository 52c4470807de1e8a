"""`TransformerLM`: a decoder-only language model whose attention layer is a choice.

Every attention layer of `dca_jax.nn` shares one interface (see `dca_jax/nn/_layer.py`), so one
model compares them on equal terms: same embedding, pre-norm blocks with a SwiGLU MLP, same head;
only `TransformerConfig.attention` changes. Positions live inside the attention layers (rotary
for softmax, window and DCA; none for the recurrent linear layers), so the model adds none.

    tokens [B, T] int -> embed * sqrt(D) -> num_layers x Block -> RMSNorm -> head -> logits [B, T, V]
    Block: x + attn(norm(x)), then x + mlp(norm(x))

Decoding mirrors the layers: `init_cache` returns one cache per block (a tuple, a pytree),
`prefill` continues from it over a chunk of tokens and `decode_step` over one token per row. The
module only holds parameters; caches are passed in and returned.

Notation: B batch, T time, D = d_model, V vocabulary size (here, not the value dim), L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn.registry import layer_spec
from dca_jax.ops import _checks, projection

def _parse_dtype(name: str, value: Any, *, allow_none: bool) -> Any:
  """A jnp dtype from a string or dtype-like, or None when allowed; ValueError naming `name`."""
  if value is None:
    if allow_none:
      return None
    raise ValueError(f"{name} must be a floating dtype, got None.")
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a floating dtype such as 'float32' or 'bfloat16', "
                     f"got {value!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {value!r} ({dtype}).")
  return dtype


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of `TransformerLM`; validated on construction.

  Attributes:
    vocab_size: V, number of token ids (default 256: bytes).
    d_model: D, the residual width.
    num_layers: L, number of blocks.
    num_heads: H, attention heads per block; must divide d_model.
    attention: the attention layer, one of `ATTENTION_TYPES`.
    attention_options: keyword options of the attention layer (e.g. `{"window": 64}` for "dca" and
      "window"), as a mapping, a sequence of (name, value) pairs or the layer's options dataclass
      (`dca_jax.nn.layer_spec(attention).options`). Stored as that (frozen, hashable) dataclass;
      `attention_kwargs` gives back the options that differ from the layer's defaults. Unknown
      option names are rejected here (TypeError naming them).
    mlp_ratio: the SwiGLU hidden width is mlp_ratio * d_model rounded up to a multiple of
      `mlp_multiple_of` (default 8/3, which keeps the MLP at the 8 D^2 parameters of a 4x GELU MLP).
    mlp_multiple_of: see `mlp_ratio`.
    dtype: compute dtype, e.g. "bfloat16" (a dtype object is accepted and stored by name), or
      None to follow the parameters. The residual stream, norms, caches and logits stay float32
      whatever it is.
    param_dtype: parameter dtype (stored by name).
    tie_embeddings: the output head reuses the token embedding (transposed).
    norm_eps: epsilon of the RMSNorms.

  Raises:
    ValueError: naming the field, for an unknown attention, num_heads not dividing d_model,
      a size that is not an integer >= 1, mlp_ratio <= 0, a bad dtype or options that are not a
      mapping from names.

  Example:
    >>> config = TransformerConfig(d_model=64, num_layers=2, num_heads=4, attention="window",
    ...                            attention_options={"window": 16})
    >>> config.attention_kwargs, config.mlp_hidden
    ({'window': 16}, 176)
  """

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  attention: str = "dca"
  attention_options: Any = None
  mlp_ratio: float = 8.0 / 3.0
  mlp_multiple_of: int = 8
  dtype: str | None = None
  param_dtype: str = "float32"
  tie_embeddings: bool = True
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_multiple_of"):
      _checks.check_positive_int(name, getattr(self, name))
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads must divide d_model, got num_heads = {self.num_heads} and "
                       f"d_model = {self.d_model}.")
    spec = layer_spec(self.attention)
    object.__setattr__(self, "attention_options", spec.parse_options(self.attention_options))
    if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
      raise ValueError(f"mlp_ratio must be a number > 0, got {self.mlp_ratio!r}.")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}.")
    # Stored by name, so that "bfloat16" and jnp.bfloat16 make equal (and equally hashed) configs.
    dtype = _parse_dtype("dtype", self.dtype, allow_none=True)
    object.__setattr__(self, "dtype", None if dtype is None else dtype.name)
    param_dtype = _parse_dtype("param_dtype", self.param_dtype, allow_none=False)
    object.__setattr__(self, "param_dtype", param_dtype.name)
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}.")

  @property
  def attention_kwargs(self) -> dict[str, Any]:
    """The attention options that differ from the layer's defaults, as keyword arguments."""
    return self.attention_options.changed()

  @property
  def mlp_hidden(self) -> int:
    """The SwiGLU hidden width: mlp_ratio * d_model rounded up to a multiple of mlp_multiple_of."""
    m = self.mlp_multiple_of
    return m * math.ceil(self.mlp_ratio * self.d_model / m)

  @property
  def compute_dtype(self) -> Any:
    """`dtype` as a jnp dtype (None when unset)."""
    return _parse_dtype("dtype", self.dtype, allow_none=True)

  @property
  def parameter_dtype(self) -> Any:
    """`param_dtype` as a jnp dtype."""
    return _parse_dtype("param_dtype", self.param_dtype, allow_none=False)


def _norm(features: int, eps: float, param_dtype: Any, rngs: nnx.Rngs) -> nnx.RMSNorm:
  # float32 normalisation whatever the compute dtype: the mean square of a bfloat16 residual
  # loses too many bits, and the norm is cheap.
  return nnx.RMSNorm(features, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class SwiGLU(nnx.Module):
  """Gated MLP: y = W_down (silu(x W_gate) * (x W_up)), without biases.

  Shapes: x [..., D] -> [..., D] (any leading dims, so blocks reuse it for one decoded token).

  Args:
    d_model: D.
    hidden: the hidden width.
    rngs: parameter initialisation keys.
    dtype: compute dtype (None: promote inputs and parameters).
    param_dtype: parameter dtype.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> SwiGLU(32, 88, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 32))).shape
    (2, 5, 32)

  References:
    Shazeer 2020, "GLU Variants Improve Transformer", eq. (6).
  """

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     dot_general=projection.dot_general, rngs=rngs)
    self.gate = linear(d_model, hidden)
    self.up = linear(d_model, hidden)
    self.down = linear(hidden, d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  The residual stream stays in the dtype of its input (float32 for `TransformerLM`); the norms
  run in float32 and the attention layer and MLP in the compute dtype.

  Shapes: x [B, T, D] -> [B, T, D]; `decode_step` x_t [B, D] -> [B, D].

  Args:
    config: the model configuration (d_model, heads, attention and its options, dtypes).
    rngs: parameter initialisation keys.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> block = Block(TransformerConfig(d_model=32, num_heads=2, attention="linear"),
    ...               rngs=nnx.Rngs(0))
    >>> block(jnp.ones((2, 5, 32))).shape
    (2, 5, 32)
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = config.compute_dtype, config.parameter_dtype
    self.compute_dtype = dtype
    self.attn_norm = _norm(config.d_model, config.norm_eps, param_dtype, rngs)
    self.attn = layer_spec(config.attention).build(
        config.d_model, config.num_heads, config.attention_options, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype)
    self.mlp_norm = _norm(config.d_model, config.norm_eps, param_dtype, rngs)
    self.mlp = SwiGLU(config.d_model, config.mlp_hidden, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def _in(self, x: jax.Array, norm: nnx.RMSNorm) -> jax.Array:
    return norm(x).astype(self.compute_dtype or x.dtype)

  def _mlp(self, x: jax.Array) -> jax.Array:
    return x + self.mlp(self._in(x, self.mlp_norm)).astype(x.dtype)

  def __call__(self, x: jax.Array, *, reset: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] -> [B, T, D]; `reset` optional bool [B, T] is passed to the attention."""
    x = x + self.attn(self._in(x, self.attn_norm), reset=reset).astype(x.dtype)
    return self._mlp(x)

  def prefill(self, x: jax.Array, cache: Any, reset: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """x [B, T, D] continuing from the attention cache -> (y [B, T, D], new cache)."""
    y, cache = self.attn.prefill(self._in(x, self.attn_norm), cache, reset)
    return self._mlp(x + y.astype(x.dtype)), cache

  def decode_step(self, x_t: jax.Array, cache: Any,
                  reset: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """One token x_t [B, D] continuing from the attention cache -> (y_t [B, D], new cache)."""
    y, cache = self.attn.decode_step(self._in(x_t, self.attn_norm), cache, reset)
    return self._mlp(x_t + y.astype(x_t.dtype)), cache


class TransformerLM(nnx.Module):
  """Decoder-only language model over token ids, with a configurable attention layer.

  The token embedding is scaled by sqrt(D) on the way in (entries of order 1 in the residual
  stream, as in Gemma) and initialised with standard deviation 1 / sqrt(D), so that tied logits
  start of order 1. The residual stream is float32; logits are float32 (the head accumulates in
  float32 even with a bfloat16 compute dtype).

  Shapes: tokens [B, T] int -> logits [B, T, V] float32; reset [B, T] bool; `decode_step`
  token [B] int -> logits [B, V].

  Args:
    config: a `TransformerConfig`.
    rngs: parameter initialisation keys.

  Raises:
    TypeError: config is not a `TransformerConfig`, or the attention layer rejects an option.
    ValueError: the attention layer rejects an option value.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> config = TransformerConfig(d_model=32, num_layers=2, num_heads=2, attention="softmax")
    >>> model = TransformerLM(config, rngs=nnx.Rngs(0))
    >>> tokens = jnp.arange(24).reshape(2, 12)
    >>> model(tokens).shape
    (2, 12, 256)
    >>> cache = model.init_cache(2, max_length=32)
    >>> logits, cache = model.prefill(tokens, cache)
    >>> logits_t, cache = model.decode_step(tokens[:, -1], cache)
    >>> logits_t.shape
    (2, 256)
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, TransformerConfig):
      raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}.")
    self.config = config
    d, v = config.d_model, config.vocab_size
    param_dtype = config.parameter_dtype
    # No compute dtype for the lookup: the float32 residual stream starts from exact rows.
    self.embed = nnx.Embed(v, d, param_dtype=param_dtype,
                           embedding_init=nnx.initializers.normal(1.0 / math.sqrt(d)), rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = _norm(d, config.norm_eps, param_dtype, rngs)
    if config.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Linear(d, v, use_bias=False, dtype=config.compute_dtype,
                             param_dtype=param_dtype, preferred_element_type=jnp.float32,
                             dot_general=projection.dot_general, rngs=rngs)

  def _check_tokens(self, tokens: Any, rank: int, name: str) -> None:
    shape = "[B, T]" if rank == 2 else "[B]"
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
      raise TypeError(f"{name} must be an integer array of shape {shape}, got "
                      f"{type(tokens).__name__}.")
    if tokens.ndim != rank:
      raise ValueError(f"{name} must have shape {shape}, got shape {tuple(tokens.shape)}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {tokens.dtype}.")
    if rank == 2 and tokens.shape[1] < 1:
      raise ValueError(f"{name} must have at least one token (T >= 1), got shape "
                       f"{tuple(tokens.shape)}.")

  def _embed(self, tokens: jax.Array) -> jax.Array:
    # Out-of-range ids would silently give NaN rows (jnp.take's fill mode); ids are validated
    # by the data pipeline, not here, since checking values would force a device sync.
    x = self.embed(tokens).astype(jnp.float32)
    return x * math.sqrt(self.config.d_model)

  def _logits(self, x: jax.Array) -> jax.Array:
    h = self.final_norm(x).astype(self.config.compute_dtype or jnp.float32)
    if self.head is not None:
      return self.head(h).astype(jnp.float32)
    table = self.embed.embedding[...].astype(h.dtype)
    return projection.project(h, table.T, None, jnp.float32)

  def __call__(self, tokens: jax.Array, *, reset: jax.Array | None = None) -> jax.Array:
    """Logits of the next token at every position.

    Args:
      tokens: [B, T] integer ids in [0, V).
      reset: optional bool [B, T]; true where a new document starts (no attention, and no
        memory, across it).

    Returns:
      [B, T, V] float32 logits; row t predicts token t + 1.

    Raises:
      TypeError, ValueError: tokens not an integer [B, T] array, or a bad reset.
    """
    self._check_tokens(tokens, 2, "tokens")
    _checks.check_reset(reset, tokens.shape[0], tokens.shape[1])
    x = self._embed(tokens)
    for block in self.blocks:
      x = block(x, reset=reset)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_length: int) -> tuple[Any, ...]:
    """Empty decode caches, one per block.

    Args:
      batch_size: B.
      max_length: the most tokens (prompt and generated) the caches must hold. Only caches that
        grow with the context (softmax attention) depend on it.

    Returns:
      A tuple of L per-layer caches (a pytree).

    Raises:
      ValueError: batch_size or max_length not an integer >= 1.
    """
    _checks.check_positive_int("batch_size", batch_size)
    _checks.check_positive_int("max_length", max_length)
    return tuple(block.attn.init_cache(batch_size, max_length) for block in self.blocks)

  def _check_cache(self, cache: Any) -> None:
    if not isinstance(cache, tuple) or len(cache) != len(self.blocks):
      got = f"a tuple of {len(cache)}" if isinstance(cache, tuple) else type(cache).__name__
      raise TypeError(f"cache must be the tuple of {len(self.blocks)} per-layer caches from "
                      f"init_cache, got {got}.")

  def prefill(self, tokens: jax.Array, cache: tuple[Any, ...],
              reset: jax.Array | None = None) -> tuple[jax.Array, tuple[Any, ...]]:
    """Runs a chunk of tokens continuing from `cache`.

    Two prefills chain like one over the concatenated tokens, and `prefill` then `decode_step`
    token by token equals the full forward.

    Args:
      tokens: [B, T] integer ids.
      cache: from `init_cache`, `prefill` or `decode_step`, with batch size B.
      reset: optional bool [B, T]; true where a new document starts (the caches' earlier
        tokens are not seen from there on).

    Returns:
      (logits [B, T, V] float32, the updated caches).

    Raises:
      TypeError, ValueError: bad tokens or cache (the layers check their own caches).
    """
    self._check_tokens(tokens, 2, "tokens")
    self._check_cache(cache)
    _checks.check_reset(reset, tokens.shape[0], tokens.shape[1])
    x = self._embed(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.prefill(x, layer_cache, reset)
      new_cache.append(layer_cache)
    return self._logits(x), tuple(new_cache)

  def decode_step(self, token: jax.Array, cache: tuple[Any, ...],
                  reset: jax.Array | None = None) -> tuple[jax.Array, tuple[Any, ...]]:
    """One token per batch row, continuing from `cache`.

    Args:
      token: [B] integer ids.
      cache: from `init_cache`, `prefill` or `decode_step`, with batch size B.
      reset: optional bool [B]; true in the rows where a new document starts at this token.

    Returns:
      (logits [B, V] float32 for the next token, the updated caches).

    Raises:
      TypeError, ValueError: bad token or cache.
    """
    self._check_tokens(token, 1, "token")
    self._check_cache(cache)
    _checks.check_step_reset(reset, token.shape[0])
    x = self._embed(token)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode_step(x, layer_cache, reset)
      new_cache.append(layer_cache)
    return self._logits(x), tuple(new_cache)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (`nnx.Param` leaves) of a module.

  A tied head adds nothing: it is the embedding.

  Example:
    >>> from flax import nnx
    >>> count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    16
  """
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
