"""DCA's parameters and per-token weights: `init_params` and `compute_weights`.

From the layer input x, per head: queries, keys and values, the feature maps phi of projected
queries and keys for the compressed memory, the data-dependent log decay (the compression rate)
and, for the gated combination, the gate logit. Notation: B batch, T time, D model width,
H heads, K key dim, V value dim, P projected feature input dim, F features, R decay rank.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax.ops import _checks
from dca_jax.ops.feature_maps import FeatureMap, feature_map
from dca_jax.ops.projection import project


class DCAParams(NamedTuple):
  """Parameters of `compute_weights` (the layer owns them; this is a plain pytree).

  Attributes:
    query: [D, H, K] query projection.
    key: [D, H, K] key projection.
    value: [D, H, V] value projection.
    feature: [H, K, P] projection of queries/keys to the feature map's input (P small, e.g. 16);
      None with the delta memory (its keys and queries are the L2-normalised k and q).
    decay: [D, H] data-dependent part of the compression rate (one rate per head); with
      per-channel decay [D, R], the down-projection of a rank-R rate, see `decay_up`.
    decay_bias: [H] sets each head's half-life at initialisation (`half_life_bias`); [H, F] with
      per-channel decay.
    decay_up: None (one rate per head) or [R, H, F]: per-channel decay, one rate per memory row
      (feature) computed as (x decay) decay_up + decay_bias, as in GLA's low-rank gates.
    gate: None (unified combination: window and memory share one softmax normaliser) or [D, H]:
      gated combination, o = g o_window + (1 - g) o_memory with g = sigmoid(x gate + gate_bias),
      each memory normalised on its own (as in Infini-attention). With the delta memory, the
      gate of its read-out: o = o_window + g S^T q^ (see `dca_delta`).
    gate_bias: [H] bias of the gate (None when `gate` is None).
    beta: None (additive memory) or [D, H]: the delta memory's writing strength,
      beta = sigmoid(x beta), one per head and token.
  """

  query: jax.Array
  key: jax.Array
  value: jax.Array
  feature: jax.Array
  decay: jax.Array
  decay_bias: jax.Array
  decay_up: jax.Array | None = None
  gate: jax.Array | None = None
  gate_bias: jax.Array | None = None
  beta: jax.Array | None = None


class DCAWeights(NamedTuple):
  """Per-token quantities of DCA, the output of `compute_weights`.

  Attributes:
    q: [B, T, H, K] queries (no position applied yet; rotary acts inside the window).
    k: [B, T, H, K] keys.
    v: [B, T, H, V] values.
    q_features: [B, T, H, F] phi of the projected queries (for the compressed memory); None with
      the delta memory.
    k_features: [B, T, H, F] phi of the projected keys; None with the delta memory.
    log_decay: [B, T, H] float32 log forgetting rate, <= 0 (the compression rate), or
      [B, T, H, F] for per-channel decay (one rate per memory row).
    gate: None (unified combination) or [B, T, H] float32 logit of the gated combination (with
      the delta memory: of the gate of its read-out).
    beta: None (additive memory) or [B, T, H] float32 in (0, 1), the delta memory's writing
      strength of each token (given: the delta memory, see `dca_delta`).
  For one decoding step the T axis is absent.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_features: jax.Array
  k_features: jax.Array
  log_decay: jax.Array
  gate: jax.Array | None = None
  beta: jax.Array | None = None


def half_life_bias(num_heads: int, window: int, max_ratio: float = 16.0) -> jax.Array:
  """Decay biases giving head h a half-life geometrically spread from W to `max_ratio` * W tokens.

  With log_decay = -softplus(x . w + b) and w = 0 at initialisation, a half-life of tau tokens
  needs softplus(b) = ln 2 / tau, i.e. b = log(expm1(ln 2 / tau)). The spread of time scales over
  heads is DCA's hierarchy: short-lived heads summarise the recent past, long-lived ones keep a
  coarse trace of the distant past.
  """
  if num_heads == 1:
    half_lives = jnp.array([float(window)])
  else:
    half_lives = window * max_ratio ** (jnp.arange(num_heads) / (num_heads - 1))
  return jnp.log(jnp.expm1(math.log(2.0) / half_lives))


def compute_weights(params: DCAParams, x: jax.Array, *, feature_map_kind: FeatureMap | str = "taylor"
                    ) -> DCAWeights:
  """From the layer input to queries, keys, values, features and the compression rate.

      q = x W_q,  k = x W_k,  v = x W_v                       (per head)
      phi_q = phi(q W_phi),  phi_k = phi(k W_phi)             (feature map on P dims)
      log_decay = -softplus(x w_a + b_a)  <= 0               (per head, data dependent)

  Args:
    params: `DCAParams`.
    x: [B, T, D] or, for one decoding step, [B, D].
    feature_map_kind: "taylor" (default; phi(q).phi(k) = 1 + u + u^2/2, u the projections'
      similarity, `feature_maps.taylor_features`) or "elu".

  Returns:
    `DCAWeights` with shapes [B, T, H, .] (or [B, H, .] for [B, D] input); q, k, v, features in
    x's dtype, log_decay float32.

  Raises:
    ValueError: when x's last dim does not match the parameters' D.

  Example:
    >>> import jax
    >>> params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=8)
    >>> w = compute_weights(params, jax.numpy.ones((1, 5, 32)))
    >>> w.q.shape, w.q_features.shape, w.log_decay.shape
    ((1, 5, 2, 16), (1, 5, 2, 45), (1, 5, 2))
  """
  _checks.check_array("x", x, (2, 3))
  d_model = params.query.shape[0]
  if x.shape[-1] != d_model:
    raise ValueError(f"x must have last dim d_model = {d_model}, got shape {tuple(x.shape)}.")
  # One compiled program per shape when called eagerly (inlined in a caller's jit).
  return _compiled_weights(params, x, feature_map_kind=FeatureMap.parse(feature_map_kind))


@functools.partial(jax.jit, static_argnames=("feature_map_kind",))
def _compiled_weights(params: DCAParams, x: jax.Array, *, feature_map_kind: FeatureMap
                      ) -> DCAWeights:
  """`compute_weights` on checked inputs."""
  d_model = params.query.shape[0]
  if params.feature is None:      # the delta memory: no feature map, a writing strength
    return _delta_weights(params, x)
  heads, key_dim = params.query.shape[1:]
  value_dim, proj_dim = params.value.shape[-1], params.feature.shape[-1]
  # One matmul for q, k, v and the feature map's inputs (q P and k P, with the per-head feature
  # projection P folded into the weights: x (W_q P) = (x W_q) P), as Gemma's fused qkv einsum: one
  # pass over x, and one weight gradient instead of five small ones.
  fused = jnp.concatenate([
      params.query.reshape(d_model, -1), params.key.reshape(d_model, -1),
      params.value.reshape(d_model, -1),
      jnp.einsum("dhk,hkp->dhp", params.query, params.feature).reshape(d_model, -1),
      jnp.einsum("dhk,hkp->dhp", params.key, params.feature).reshape(d_model, -1)], axis=1)
  y = project(x, fused.astype(x.dtype))
  sizes = (heads * key_dim, heads * key_dim, heads * value_dim, heads * proj_dim, heads * proj_dim)
  q, k, v, q_in, k_in = (part.reshape(x.shape[:-1] + (heads, -1))
                         for part in jnp.split(y, np.cumsum(sizes)[:-1], axis=-1))
  q_features = feature_map(feature_map_kind, q_in)
  k_features = feature_map(feature_map_kind, k_in)
  x32 = x.astype(jnp.float32)
  if params.decay_up is None:
    rate = jnp.einsum("...d,dh->...h", x32, params.decay.astype(jnp.float32))
  else:
    low = jnp.einsum("...d,dr->...r", x32, params.decay.astype(jnp.float32))
    rate = jnp.einsum("...r,rhf->...hf", low, params.decay_up.astype(jnp.float32))
  log_decay = -jax.nn.softplus(rate + params.decay_bias.astype(jnp.float32))
  gate = None
  if params.gate is not None:
    gate = jnp.einsum("...d,dh->...h", x32, params.gate.astype(jnp.float32))
    gate = gate + params.gate_bias.astype(jnp.float32)
  return DCAWeights(q, k, v, q_features, k_features, log_decay, gate)


def _delta_weights(params: DCAParams, x: jax.Array) -> DCAWeights:
  """`compute_weights` for the delta memory: q, k, v, log decay, the read-out gate and beta."""
  d_model, heads = params.query.shape[:2]
  fused = jnp.concatenate([params.query.reshape(d_model, -1), params.key.reshape(d_model, -1),
                           params.value.reshape(d_model, -1)], axis=1)
  y = project(x, fused.astype(x.dtype))
  width = params.query.shape[1] * params.query.shape[2]
  q, k, v = (part.reshape(x.shape[:-1] + (heads, -1))
             for part in jnp.split(y, [width, 2 * width], axis=-1))
  x32 = x.astype(jnp.float32)
  per_head = lambda w, b=None: (jnp.einsum("...d,dh->...h", x32, w.astype(jnp.float32))
                                + (0.0 if b is None else b.astype(jnp.float32)))
  log_decay = -jax.nn.softplus(per_head(params.decay, params.decay_bias))
  return DCAWeights(q, k, v, None, None, log_decay, gate=per_head(params.gate, params.gate_bias),
                    beta=jax.nn.sigmoid(per_head(params.beta)))


class Combine(str, enum.Enum):
  """How the window and the compressed memory are combined (see `DCAParams.gate`)."""
  UNIFIED = "unified"    # one softmax normaliser over both (default)
  GATED = "gated"        # each normalised on its own, mixed by a learned sigmoid gate

  @classmethod
  def parse(cls, value: "Combine | str") -> "Combine":
    return _checks.parse_choice(cls, value, "combine")


class MemoryKind(str, enum.Enum):
  """How the compressed memory is updated with the tokens that leave the window."""
  ADDITIVE = "additive"  # M <- a M + phi(k) [v, 1]^T, read under the window's normaliser (default)
  DELTA = "delta"        # the gated delta rule on unit keys, read out through a gate (`dca_delta`)

  @classmethod
  def parse(cls, value: "MemoryKind | str") -> "MemoryKind":
    return _checks.parse_choice(cls, value, "memory")


class DecayKind(str, enum.Enum):
  """Granularity of the compression rate (see `DCAParams.decay_up`)."""
  HEAD = "head"          # one rate per head and token (default)
  CHANNEL = "channel"    # one rate per memory row (feature), low-rank data dependent

  @classmethod
  def parse(cls, value: "DecayKind | str") -> "DecayKind":
    return _checks.parse_choice(cls, value, "decay")


def init_params(key: jax.Array, d_model: int, num_heads: int, *, window: int, head_dim: int | None = None,
                value_dim: int | None = None, feature_dim: int = 8, max_half_life_ratio: float = 16.0,
                num_features: int | None = None, combine: Combine | str = "unified",
                decay: DecayKind | str = "head", decay_rank: int = 16,
                memory: MemoryKind | str = "additive") -> DCAParams:
  """Initial `DCAParams` (lecun-normal projections, zero decay weights, spread half-lives).

  `num_features` (F, needed for per-channel decay) defaults to the Taylor map's size for
  `feature_dim`. The gate starts at zero weights and bias (g = 1/2 for every token); per-channel
  rates start data-independent with each head's half-life on all its rows.

  memory="delta" (one rate per head and the unified combination only) has no feature
  projection; its writing strength `beta` starts lecun-normal (as Gated DeltaNet's projection)
  and its read-out gate at zero weights and bias -2 (g = 0.12: the memory starts as a small
  correction of the window). The other parameters are drawn as for the additive memory.

  Raises:
    ValueError: naming the option, for a bad one or for memory="delta" with combine="gated" or
      decay="channel".
  """
  _checks.check_positive_int("d_model", d_model)
  _checks.check_positive_int("num_heads", num_heads)
  _checks.check_positive_int("window", window)
  _checks.check_positive_int("feature_dim", feature_dim)
  _checks.check_positive_int("decay_rank", decay_rank)
  combine, decay = Combine.parse(combine), DecayKind.parse(decay)
  memory = MemoryKind.parse(memory)
  if memory is MemoryKind.DELTA and (combine is not Combine.UNIFIED or decay is not DecayKind.HEAD):
    raise ValueError(
        f"memory='delta' adds its read-out through its own gate with one decay per head: it "
        f"needs combine='unified' and decay='head', got combine={combine.value!r} and "
        f"decay={decay.value!r}.")
  head_dim = head_dim or d_model // num_heads
  value_dim = value_dim or head_dim
  if num_features is None:
    num_features = 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
  kq, kk, kv, kf, kd = jax.random.split(key, 5)
  projection = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
  per_head = jax.nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
  f32 = jnp.float32
  bias = half_life_bias(num_heads, window, max_half_life_ratio)
  extra = {}
  if decay is DecayKind.HEAD:
    decay_weight = jnp.zeros((d_model, num_heads), f32)
  else:
    # Down-projection random, up-projection zero: rates start data independent, and the
    # gradient reaches both (d/d up needs x decay != 0, d/d down needs up != 0 after one step).
    decay_weight = jax.nn.initializers.lecun_normal()(kd, (d_model, decay_rank), f32)
    extra["decay_up"] = jnp.zeros((decay_rank, num_heads, num_features), f32)
    bias = jnp.broadcast_to(bias[:, None], (num_heads, num_features))
  if combine is Combine.GATED:
    extra["gate"] = jnp.zeros((d_model, num_heads), f32)
    extra["gate_bias"] = jnp.zeros((num_heads,), f32)
  feature = per_head(kf, (num_heads, head_dim, feature_dim), f32)
  if memory is MemoryKind.DELTA:
    # A key of its own (the additive memory's draws stay what they were).
    feature = None
    extra["beta"] = jax.nn.initializers.lecun_normal()(
        jax.random.fold_in(key, 1), (d_model, num_heads), f32)
    extra["gate"] = jnp.zeros((d_model, num_heads), f32)
    extra["gate_bias"] = jnp.full((num_heads,), -2.0, f32)
  return DCAParams(
      query=projection(kq, (d_model, num_heads, head_dim), f32),
      key=projection(kk, (d_model, num_heads, head_dim), f32),
      value=projection(kv, (d_model, num_heads, value_dim), f32),
      feature=feature, decay=decay_weight, decay_bias=bias, **extra)


def check_weights(weights: DCAWeights, step: bool) -> None:
  rank = 3 if step else 4
  names = ("q", "k", "v", "q_features", "k_features")
  for name in names:
    _checks.check_array(f"weights.{name}", getattr(weights, name), rank)
  _checks.check_array("weights.log_decay", weights.log_decay, (rank - 1, rank))
  lead = weights.q.shape[:-1]
  for name in names[1:]:
    got = getattr(weights, name).shape[:-1]
    if got != lead:
      raise ValueError(f"weights.{name} has leading shape {got}, expected {lead} (from weights.q).")
  per_channel = lead + (weights.q_features.shape[-1],)
  if weights.log_decay.shape not in (lead, per_channel):
    raise ValueError(f"weights.log_decay has shape {weights.log_decay.shape}, expected {lead} "
                     f"(per head) or {per_channel} (per channel).")
  if weights.gate is not None:
    _checks.check_array("weights.gate", weights.gate, rank - 1)
    if weights.gate.shape != lead:
      raise ValueError(f"weights.gate has shape {weights.gate.shape}, expected {lead}.")
  if weights.k.shape[-1] != weights.q.shape[-1]:
    raise ValueError(f"weights.k has key dim {weights.k.shape[-1]}, expected {weights.q.shape[-1]}.")
  if weights.k_features.shape[-1] != weights.q_features.shape[-1]:
    raise ValueError("weights.k_features and weights.q_features must have the same feature dim, got "
                     f"{weights.k_features.shape[-1]} and {weights.q_features.shape[-1]}.")


