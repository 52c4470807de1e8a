"""Dynamic Compression Attention (DCA) as pure functions: the glossary of the library.

Per head, DCA keeps the last W tokens exactly (working memory, exact softmax) and folds every
token that leaves the window into a fixed-size matrix state (compressed memory) whose forgetting
rate is computed from the input (dynamic compression), with heads initialised at geometrically
spread half-lives (hierarchical compression). With s_tj = q_t . k_j / sqrt(K) (rotary positions,
relative offsets < W only) and phi a positive feature map with phi(q) . phi(k) ~ exp(s):

    window:  N_t = sum_{j in (t-W, t]} e^{s_tj - m_t} v_j,   Z_t = sum_{j in (t-W, t]} e^{s_tj - m_t}
    memory:  M_t = a_t M_{t-1} + phi(k_{t-W}) [v_{t-W}, 1]^T        (a_t = exp(log_decay_t))
    output:  o_t = (N_t + e^{-m_t} phi(q_t)^T M_t[:, :V]) / (Z_t + e^{-m_t} phi(q_t)^T M_t[:, V])

where both terms are evaluated relative to m_t = max(max_j s_tj, log(phi(q_t)^T z_t)) (z the
memory's normaliser column), so every exponential is <= 1 and the denominator >= 1; the output
does not depend on m_t. The memory is the gated linear attention engine
run on the stream delayed by W tokens, so a token is counted either in the window or in the
memory, never in both. When T <= W the memory is empty and DCA is exactly causal softmax.

Functions (B batch, T time, H heads, K key dim, V value dim, F feature dim, W window):

* `compute_weights`: input -> queries, keys, values, features, log decays.
* `attention_compress`: a whole sequence (training, prefill), any engine form.
* `memory_state_update`: one decoding step on a constant-size `DCAState`.
* `adaptive_scale`: the plan (exact softmax, compressed with a chunk size, or single step).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dca_jax.ops import _checks
from dca_jax.ops.feature_maps import FeatureMap, feature_map
from dca_jax.ops.gla import gated_linear_attention
from dca_jax.ops.planner import EnginePlan, Mode, plan_engine
from dca_jax.ops.rotary import apply_rotary
from dca_jax.ops.window import window_softmax_parts


class DCAParams(NamedTuple):
  """Parameters of `compute_weights` (the layer owns them; this is a plain pytree).

  Attributes:
    query: [D, H, K] query projection.
    key: [D, H, K] key projection.
    value: [D, H, V] value projection.
    feature: [H, K, P] projection of queries/keys to the feature map's input (P small, e.g. 16).
    decay: [D, H] data-dependent part of the compression rate (one rate per head); with
      per-channel decay [D, R], the down-projection of a rank-R rate, see `decay_up`.
    decay_bias: [H] sets each head's half-life at initialisation (`half_life_bias`); [H, F] with
      per-channel decay.
    decay_up: None (one rate per head) or [R, H, F]: per-channel decay, one rate per memory row
      (feature) computed as (x decay) decay_up + decay_bias, as in GLA's low-rank gates.
    gate: None (unified combination: window and memory share one softmax normaliser) or [D, H]:
      gated combination, o = g o_window + (1 - g) o_memory with g = sigmoid(x gate + gate_bias),
      each memory normalised on its own (as in Infini-attention).
    gate_bias: [H] bias of the gate (None when `gate` is None).
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


class DCAWeights(NamedTuple):
  """Per-token quantities of DCA, the output of `compute_weights`.

  Attributes:
    q: [B, T, H, K] queries (no position applied yet; rotary acts inside the window).
    k: [B, T, H, K] keys.
    v: [B, T, H, V] values.
    q_features: [B, T, H, F] phi of the projected queries (for the compressed memory).
    k_features: [B, T, H, F] phi of the projected keys.
    log_decay: [B, T, H] float32 log forgetting rate, <= 0 (the compression rate), or
      [B, T, H, F] for per-channel decay (one rate per memory row).
    gate: None (unified combination) or [B, T, H] float32 logit of the gated combination.
  For one decoding step the T axis is absent.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_features: jax.Array
  k_features: jax.Array
  log_decay: jax.Array
  gate: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DCAState:
  """Constant-size state of DCA after a prefix of the sequence.

  Attributes:
    keys: [B, W, H, K] float32, the last W keys, oldest first (working memory).
    values: [B, W, H, V] float32, their values.
    key_features: [B, W, H, F] float32, their features (folded into memory on eviction).
    doc: [B, W] int32, document of each slot relative to the current one: 0 = same document as
      the last token, negative = an earlier document or an empty slot (never attended).
    memory: [B, H, F, V + 1] float32 compressed memory; the last column is the normaliser z.
  """

  keys: jax.Array
  values: jax.Array
  key_features: jax.Array
  doc: jax.Array
  memory: jax.Array

  @property
  def window(self) -> int:
    return self.keys.shape[1]


def init_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, feature_dim: int,
               window: int) -> DCAState:
  """An empty `DCAState` (no token seen): zero memory, every window slot empty."""
  for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("key_dim", key_dim),
                      ("value_dim", value_dim), ("feature_dim", feature_dim), ("window", window)):
    _checks.check_positive_int(name, value)
  f32 = jnp.float32
  return DCAState(
      keys=jnp.zeros((batch_size, window, num_heads, key_dim), f32),
      values=jnp.zeros((batch_size, window, num_heads, value_dim), f32),
      key_features=jnp.zeros((batch_size, window, num_heads, feature_dim), f32),
      doc=jnp.full((batch_size, window), -1, jnp.int32),
      memory=jnp.zeros((batch_size, num_heads, feature_dim, value_dim + 1), f32),
  )


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
    feature_map_kind: "taylor" (default; phi(q).phi(k) = 1 + s + s^2/2) or "elu".

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
    ((1, 5, 2, 16), (1, 5, 2, 153), (1, 5, 2))
  """
  _checks.check_array("x", x, (2, 3))
  d_model = params.query.shape[0]
  if x.shape[-1] != d_model:
    raise ValueError(f"x must have last dim d_model = {d_model}, got shape {tuple(x.shape)}.")
  dtype = x.dtype
  q = jnp.einsum("...d,dhk->...hk", x, params.query.astype(dtype))
  k = jnp.einsum("...d,dhk->...hk", x, params.key.astype(dtype))
  v = jnp.einsum("...d,dhk->...hk", x, params.value.astype(dtype))
  project = params.feature.astype(dtype)
  q_features = feature_map(feature_map_kind, jnp.einsum("...hk,hkp->...hp", q, project))
  k_features = feature_map(feature_map_kind, jnp.einsum("...hk,hkp->...hp", k, project))
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


class Combine(str, enum.Enum):
  """How the window and the compressed memory are combined (see `DCAParams.gate`)."""
  UNIFIED = "unified"    # one softmax normaliser over both (default)
  GATED = "gated"        # each normalised on its own, mixed by a learned sigmoid gate

  @classmethod
  def parse(cls, value: "Combine | str") -> "Combine":
    return _checks.parse_choice(cls, value, "combine")


class DecayKind(str, enum.Enum):
  """Granularity of the compression rate (see `DCAParams.decay_up`)."""
  HEAD = "head"          # one rate per head and token (default)
  CHANNEL = "channel"    # one rate per memory row (feature), low-rank data dependent

  @classmethod
  def parse(cls, value: "DecayKind | str") -> "DecayKind":
    return _checks.parse_choice(cls, value, "decay")


def init_params(key: jax.Array, d_model: int, num_heads: int, *, window: int, head_dim: int | None = None,
                value_dim: int | None = None, feature_dim: int = 16, max_half_life_ratio: float = 16.0,
                num_features: int | None = None, combine: Combine | str = "unified",
                decay: DecayKind | str = "head", decay_rank: int = 16) -> DCAParams:
  """Initial `DCAParams` (lecun-normal projections, zero decay weights, spread half-lives).

  `num_features` (F, needed for per-channel decay) defaults to the Taylor map's size for
  `feature_dim`. The gate starts at zero weights and bias (g = 1/2 for every token); per-channel
  rates start data-independent with each head's half-life on all its rows.
  """
  _checks.check_positive_int("d_model", d_model)
  _checks.check_positive_int("num_heads", num_heads)
  _checks.check_positive_int("window", window)
  _checks.check_positive_int("decay_rank", decay_rank)
  combine, decay = Combine.parse(combine), DecayKind.parse(decay)
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
  return DCAParams(
      query=projection(kq, (d_model, num_heads, head_dim), f32),
      key=projection(kk, (d_model, num_heads, head_dim), f32),
      value=projection(kv, (d_model, num_heads, value_dim), f32),
      feature=per_head(kf, (num_heads, head_dim, feature_dim), f32),
      decay=decay_weight, decay_bias=bias, **extra)


class PlanKind(str, enum.Enum):
  SOFTMAX = "softmax"          # T <= W and no carried state: the memory is empty
  COMPRESSED = "compressed"    # window + compressed memory through the engine
  STEP = "step"                # one decoding step on a DCAState


@dataclasses.dataclass(frozen=True)
class DCAPlan:
  """What `adaptive_scale` decided.

  Attributes:
    kind: `PlanKind`.
    engine: the engine's form and chunk size for the compressed memory (None for SOFTMAX/STEP).
  """

  kind: PlanKind
  engine: EnginePlan | None = None


def adaptive_scale(sequence_length: int, *, window: int, feature_dim: int = 153, value_dim: int = 64,
                   has_state: bool = False, decoding: bool = False, needs_grad: bool = False,
                   backend: str | None = None) -> DCAPlan:
  """Chooses how much machinery a call needs: the computation adapts to the input's length.

  * decoding (one token continuing a state): `memory_state_update`, O(W K + F V) per token;
  * T <= W with no carried state: no token has left the window, so the memory is empty and DCA
    is exact causal softmax over T tokens (no engine call at all);
  * otherwise: window + compressed memory, the engine's form and chunk size chosen by its
    planner (`plan_engine`, measured by experiments/benchmark_engine.py).

  Args:
    sequence_length: T.
    window: W.
    feature_dim: F, the memory's key dimension.
    value_dim: V.
    has_state: whether the call continues from a `DCAState`.
    decoding: whether this is a single-token decoding step.
    needs_grad: passed to the engine planner.
    backend: "cpu", "gpu", "tpu"; default `jax.default_backend()`.

  Returns:
    A `DCAPlan`.

  Example:
    >>> adaptive_scale(48, window=64).kind.value
    'softmax'
    >>> adaptive_scale(4096, window=64, needs_grad=True, backend="cpu").engine.mode.value
    'chunked'
  """
  _checks.check_positive_int("sequence_length", sequence_length)
  _checks.check_positive_int("window", window)
  if decoding:
    return DCAPlan(PlanKind.STEP)
  if sequence_length <= window and not has_state:
    return DCAPlan(PlanKind.SOFTMAX)
  engine = plan_engine(sequence_length, feature_dim, value_dim + 1, backend=backend,
                       needs_grad=needs_grad)
  return DCAPlan(PlanKind.COMPRESSED, engine)


def _check_weights(weights: DCAWeights, step: bool) -> None:
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


def _check_state(state: DCAState, batch: int, weights: DCAWeights) -> None:
  heads, key_dim = weights.q.shape[-2:]
  value_dim, feature_dim = weights.v.shape[-1], weights.q_features.shape[-1]
  window = state.window
  expected = {
      "keys": (batch, window, heads, key_dim),
      "values": (batch, window, heads, value_dim),
      "key_features": (batch, window, heads, feature_dim),
      "doc": (batch, window),
      "memory": (batch, heads, feature_dim, value_dim + 1),
  }
  for name, shape in expected.items():
    got = tuple(getattr(state, name).shape)
    if got != shape:
      raise ValueError(f"state.{name} has shape {got}, expected {shape} (from the weights' B, H, K, V, F).")


def _combine(window_num, window_den, window_max, memory_out, value_dim, gate=None):
  """Both memories under one normaliser, with a stabiliser that keeps every term finite.

      o = (N e^{m_w} + M_num) / (Z e^{m_w} + M_den),   N, Z computed relative to m_w (window max)

  is evaluated relative to m = max(m_w, log M_den): every exponential is then <= 1 and one of
  the two weights is exactly 1, so the denominator is >= 1 (no NaN even when all window scores
  are far below zero and the memory is empty). o does not depend on m, hence no gradient.

  With a `gate` logit g (gated combination) the two are normalised separately instead:
  o = sigmoid(g) N / Z + (1 - sigmoid(g)) M_num / M_den (an empty memory contributes 0).
  """
  mem_num, mem_den = memory_out[..., :value_dim], memory_out[..., value_dim]
  has_memory = mem_den > 0
  safe_den = jnp.where(has_memory, mem_den, 1.0)
  if gate is not None:
    g = jax.nn.sigmoid(gate)[..., None]
    mem_mean = jnp.where(has_memory[..., None], mem_num / safe_den[..., None], 0.0)
    return g * window_num / window_den[..., None] + (1.0 - g) * mem_mean
  log_mem = jnp.where(has_memory, jnp.log(safe_den), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.maximum(window_max, log_mem))
  window_weight = jnp.exp(window_max - top)[..., None]
  memory_weight = jnp.exp(log_mem - top)[..., None]
  mem_mean = jnp.where(has_memory[..., None], mem_num / safe_den[..., None], 0.0)
  num = window_num * window_weight + memory_weight * mem_mean
  den = window_den[..., None] * window_weight + memory_weight
  return num / den


def attention_compress(weights: DCAWeights, *, window: int, reset: jax.Array | None = None,
                       state: DCAState | None = None, mode: Mode | str = "auto",
                       chunk_size: int | None = None, rotary_base: float | None = 10000.0,
                       return_state: bool = False):
  """DCA over a whole sequence: exact softmax over the last W tokens + compressed memory of the rest.

  Implements the module-level equations for t = 1..T, continuing from `state` when given (so
  two calls chained through the returned state equal one call over the concatenation).

  Args:
    weights: `DCAWeights` from `compute_weights`, shapes [B, T, H, .].
    window: W >= 1, the number of most recent tokens seen exactly (the token itself included).
    reset: optional bool [B, T]; true where a new document starts (nothing crosses it: neither
      the window nor the memory).
    state: optional `DCAState` to continue from (its window must equal `window`).
    mode: engine form for the memory: "auto", "chunked", "recurrent", "associative",
      "quadratic" (see `gated_linear_attention`).
    chunk_size: engine chunk size (chunked form).
    rotary_base: rotary embedding base for the window scores (relative offsets < W only), or
      None for no positions in the window.
    return_state: also return the `DCAState` after the last token.

  Returns:
    o [B, T, H, V] in v's dtype, or (o, state) when `return_state`.

  Raises:
    ValueError / TypeError: malformed weights, window < 1, reset or state of the wrong shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=8)
    >>> x = jax.random.normal(jax.random.key(1), (1, 20, 32))
    >>> o = attention_compress(compute_weights(params, x), window=8)
    >>> o.shape
    (1, 20, 2, 16)

  References:
    Design brief sec. 3; Arora et al. 2024 (Based: linear attention beside a sliding window);
    Munkhdalai et al. 2024 (Infini-attention: compressive memory beside local attention).
  """
  _check_weights(weights, step=False)
  _checks.check_positive_int("window", window)
  _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
  batch, time, heads, key_dim = weights.q.shape
  value_dim = weights.v.shape[-1]
  _checks.check_reset(reset, batch, time)
  if state is not None:
    if not isinstance(state, DCAState):
      raise TypeError(f"state must be a DCAState or None, got {type(state).__name__}.")
    if state.window != window:
      raise ValueError(f"state has a window of {state.window} slots, expected window = {window}.")
    _check_state(state, batch, weights)
  mode = Mode.parse(mode)
  out_dtype = weights.v.dtype
  scale = 1.0 / math.sqrt(key_dim)
  f32 = jnp.float32
  doc = jnp.zeros((batch, time), jnp.int32)
  if reset is not None:
    doc = jax.lax.associative_scan(jnp.add, reset.astype(jnp.int32), axis=1)

  plan = adaptive_scale(time, window=window, feature_dim=weights.q_features.shape[-1],
                        value_dim=value_dim, has_state=state is not None)
  if plan.kind is PlanKind.SOFTMAX and not return_state and weights.gate is None:
    num, den, _ = window_softmax_parts(weights.q, weights.k, weights.v, window=window, scale=scale,
                                       doc=doc, rotary_base=rotary_base)
    return (num / den[..., None]).astype(out_dtype)

  if state is None:
    state = init_state(batch, heads, key_dim, value_dim, weights.q_features.shape[-1], window)
  # The sequence extended on the left by the W buffered tokens: the window of the first queries
  # reaches into the buffer, and the buffer's tokens are the first to leave the window.
  ext_k = jnp.concatenate([state.keys, weights.k.astype(f32)], axis=1)
  ext_v = jnp.concatenate([state.values, weights.v.astype(f32)], axis=1)
  ext_kf = jnp.concatenate([state.key_features, weights.k_features.astype(f32)], axis=1)
  ext_doc = jnp.concatenate([state.doc, doc], axis=1)
  ext_q = jnp.concatenate([jnp.zeros_like(state.keys), weights.q.astype(f32)], axis=1)
  num, den, top = window_softmax_parts(ext_q, ext_k, ext_v, window=window, scale=scale, doc=ext_doc,
                                       rotary_base=rotary_base)
  num, den, top = num[:, window:], den[:, window:], top[:, window:]

  # Memory: step t folds in the token at t - W, if it belongs to t's document (otherwise it
  # left with the reset that started t's document).
  same_doc = (ext_doc[:, :time] == doc)[:, :, None, None]
  inserted_features = jnp.where(same_doc, ext_kf[:, :time], 0.0)
  ones = jnp.ones(ext_v.shape[:-1] + (1,), f32)
  inserted_values = jnp.concatenate([ext_v, ones], axis=-1)[:, :time]
  memory_out, memory = gated_linear_attention(
      weights.q_features.astype(f32), inserted_features, inserted_values, weights.log_decay,
      initial_state=state.memory, reset=reset, mode=mode, chunk_size=chunk_size,
      return_final_state=True)
  o = _combine(num, den, top, memory_out, value_dim, weights.gate).astype(out_dtype)
  if not return_state:
    return o
  last_doc = ext_doc[:, -1:]
  new_state = DCAState(
      keys=ext_k[:, -window:], values=ext_v[:, -window:], key_features=ext_kf[:, -window:],
      doc=ext_doc[:, -window:] - last_doc, memory=memory)
  return o, new_state


def memory_state_update(state: DCAState, weights: DCAWeights, *, rotary_base: float | None = 10000.0):
  """One decoding step of DCA with a constant-size state: O(W K + F V) work, independent of t.

  The oldest buffered token leaves the window and is folded into the compressed memory
  (M <- a_t M + phi(k_{t-W}) [v_{t-W}, 1]^T), the new token enters the window, and the output
  combines both memories under one normaliser (module docstring). Equal, step by step, to
  `attention_compress` over the whole sequence.

  Args:
    state: `DCAState` (from `init_state` or `attention_compress(..., return_state=True)`).
    weights: `DCAWeights` of one token: q, k [B, H, K], v [B, H, V], features [B, H, F],
      log_decay [B, H].
    rotary_base: as in `attention_compress` (must match it for the two to agree).

  Returns:
    (o [B, H, V] in v's dtype, new `DCAState`).

  Raises:
    ValueError / TypeError: malformed weights or a state of another shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=8)
    >>> state = init_state(1, 2, 16, 16, 153, 8)
    >>> o, state = memory_state_update(state, compute_weights(params, jnp.ones((1, 32))))
    >>> o.shape
    (1, 2, 16)
  """
  _check_weights(weights, step=True)
  if not isinstance(state, DCAState):
    raise TypeError(f"state must be a DCAState, got {type(state).__name__}.")
  batch = weights.q.shape[0]
  _check_state(state, batch, weights)
  f32 = jnp.float32
  window = state.window
  key_dim, value_dim = weights.q.shape[-1], weights.v.shape[-1]

  # Evict the oldest slot into memory (an empty or foreign slot adds nothing).
  leaving = (state.doc[:, 0] == 0)[:, None, None]
  features = jnp.where(leaving, state.key_features[:, 0], 0.0)                      # [B, H, F]
  values = jnp.concatenate([state.values[:, 0], jnp.ones((batch, weights.v.shape[-2], 1), f32)], -1)
  decay = jnp.exp(weights.log_decay.astype(f32))
  decay = decay[..., None] if decay.ndim == 3 else decay[..., None, None]   # per channel / head
  memory = decay * state.memory + features[..., :, None] * values[..., None, :]

  def push(buffer, new):
    return jnp.concatenate([buffer[:, 1:], new[:, None].astype(buffer.dtype)], axis=1)

  keys = push(state.keys, weights.k)
  vals = push(state.values, weights.v)
  key_features = push(state.key_features, weights.k_features)
  doc = push(state.doc, jnp.zeros((batch,), jnp.int32))

  q = weights.q.astype(f32)
  k = keys
  if rotary_base is not None:
    # Slot s holds the token W - 1 - s steps back: rotate it back by that offset, leave q as is.
    offsets = jnp.arange(window) - (window - 1)
    k = apply_rotary(keys, offsets, base=rotary_base)
  scores = jnp.einsum("bhk,bshk->bhs", q, k) / math.sqrt(key_dim)
  valid = (doc == 0)[:, None, :]
  scores = jnp.where(valid, scores, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1))   # the new token is always valid
  probs = jnp.exp(scores - top[..., None])
  num = jnp.einsum("bhs,bshv->bhv", probs, vals)
  den = jnp.sum(probs, axis=-1)
  memory_out = jnp.einsum("bhf,bhfv->bhv", weights.q_features.astype(f32), memory)
  o = _combine(num, den, top, memory_out, value_dim, weights.gate).astype(weights.v.dtype)
  return o, DCAState(keys=keys, values=vals, key_features=key_features, doc=doc, memory=memory)
