"""A `TransformerLM`'s DCA decode step written directly as a compact ONNX graph.

jax2onnx converts the decode step primitive by primitive: ~1,350 ONNX nodes for the demo-size
model (2 layers), most of them index bookkeeping (broadcasts, shape arithmetic, clamped
gathers) around a step that is only ~1 MFLOP, so ONNX Runtime spends its time dispatching
nodes. This module writes the same step from the model's maths with ~85 nodes per layer: the
weights are rearranged once at export time so that one matrix product yields everything the
step needs, and the ring buffer's index arithmetic becomes small constant tables.

The program has the inputs, outputs and cache layout of `export.export_onnx`'s jax2onnx export
(`export.io_names`, `export.cache_layout`), so the runner and the manifest do not change:

    decode_step(token [B] int32, *past cache) -> (logits [B, V] float32, *present cache)

Per block, from the residual x [B, D] (H heads, K = V head dims, P feature inputs, F features,
W window, W + 1 ring slots (`slots`), t the layer's cache position; the maths of
`dca_jax.ops.memory_state_update`):

  h = RMSNorm(x); c = sum_i kernel_i * [inputs, h]_i              (the short convolution)
  y = c W + b, one Gemm whose column blocks are
      [q / sqrt(K), k]            per head, the queries pre-scaled for the window scores,
      [rot(q) / sqrt(K), rot(k)]  the same with each half-split pair (x1, x2) -> (-x2, x1),
      v,
      [1, q P, 1, k P]            the feature map's inputs, each led by a constant 1 (bias),
      z = x w_a + b_a             the compression rate's logit;
  rotary at t: [q, k] cos(t f) + rot([q, k]) sin(t f), the angles from the exact int32 phase
      of `rotary.rotary_phase` (the sine as the cosine a quarter turn earlier);
  Taylor features: with a = [1, x], each feature is a_i a_j w for fixed i, j, w (1, x_i and
      x_i x_j): two Gathers and two Muls;
  decay a_t = exp(-softplus(z));
  the new token written into slot t mod (W + 1) (ScatterND); the token in slot
      (t + 1) mod (W + 1) leaves the window when t - W >= max(doc_start, 0):
      M <- a_t M + [phi(k_out) v_out^T, phi(k_out)];
  the window's scores q . keys over the slots whose offset r_s = (s - (t + 1)) mod (W + 1) satisfies
      r_s >= max(1, doc_start - (t - W)) (`step_slots`), and the memory's read-out
      [N, Z] = phi(q)^T M: one softmax over [scores, log Z] against [values; N / Z] is the
      unified combination of `combine_memories` (an empty memory, Z <= 0, weighs 0);
  x <- x + o W_o, then x <- x + W_down(silu(n W_gate) * (n W_up)), n = RMSNorm(x).

The numerics are JAX's up to float32 rounding (a few ulp per step, e.g. from the pre-scaled query and a softmax taken
at once rather than in two rescaled parts); tests/test_export.py holds the graph to 1e-5 relative of
JAX's `decode_step` over hundreds of steps, the ring wrapping and the memory filling.

Supported: DCA with the additive memory, the unified combination, one decay rate per head, the
Taylor or elu feature map, any rotary base (or none), a short convolution of width 0 or >= 2,
float32 parameters and compute. `unsupported_reason` says why another model is not;
`export.export_onnx` then falls back to jax2onnx.

Notation: B batch, D d_model, V vocabulary (logits) or value dim (heads), as above.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from dca_jax import ops


def unsupported_reason(model: Any) -> str | None:
  """Why `decode_step_model` cannot write `model`'s decode step, or None when it can.

  Args:
    model: a `TransformerLM`.

  Returns:
    None, or a sentence naming the attention or option the graph builder does not implement.
  """
  from dca_jax.nn.dca import DCAttention  # pylint: disable=import-outside-toplevel

  config = model.config
  if config.attention != "dca":
    return f"attention {config.attention!r} (the graph builder writes DCA only)"
  if config.dtype not in (None, "float32") or config.param_dtype != "float32":
    return (f"dtype {config.dtype!r} / param_dtype {config.param_dtype!r} (the graph builder "
            f"writes float32 only)")
  for i, block in enumerate(model.blocks):
    layer = block.attn
    if not isinstance(layer, DCAttention):
      return f"layer {i} is a {type(layer).__name__}"
    if layer.memory is not ops.MemoryKind.ADDITIVE:
      return f"memory={layer.memory.value!r} (the graph builder writes the additive memory)"
    if layer.gate is not None:
      return "combine='gated' (the graph builder writes the unified combination)"
    if layer.decay_up is not None:
      return "decay='channel' (the graph builder writes one decay rate per head)"
    if layer.short_conv == 1:
      return "short_conv=1 (a convolution without history; use 0 or >= 2)"
    if layer.dtype not in (None, jnp.float32) or layer.out.dtype not in (None, jnp.float32):
      return f"layer {i} computes in {layer.dtype} (the graph builder writes float32 only)"
  return None


class _Graph:
  """Nodes and initializers of an ONNX graph under construction, with unique value names."""

  def __init__(self):
    from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
    self._helper, self._numpy_helper = helper, numpy_helper
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self._count = 0
    self._constants: dict[tuple, str] = {}
    self.shared: dict[str, str] = {}     # values built once for every layer

  def _name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, hint: str, value: Any, dtype: Any = None) -> str:
    """An initializer holding `value` (cast to `dtype`; None: a NumPy value's own dtype, else
    float32); returns its name. Equal small constants under one hint are stored once."""
    if dtype is None:
      dtype = value.dtype if isinstance(value, (np.ndarray, np.generic)) else np.float32
    array = np.array(value, dtype=dtype, order="C")   # (ascontiguousarray would make 0-d 1-d)
    key = (hint, array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
    if key in self._constants:
      return self._constants[key]
    name = self._name(hint)
    self.initializers.append(self._numpy_helper.from_array(array, name))
    if key is not None:
      self._constants[key] = name
    return name

  def ints(self, hint: str, values: Sequence[int]) -> str:
    """An int64 vector (shapes, axes, split sizes)."""
    return self.const(hint, list(values), np.int64)

  def row_head_shape(self, heads: int) -> str:
    """The int64 shape [B, H, 1, 1] of the batch (the token input's length), built once."""
    key = f"row_head_shape{heads}"
    if key not in self.shared:
      batch = self.op("Shape", ["token"], "batch_size")                            # [1] int64
      self.shared[key] = self.op("Concat", [batch, self.ints("heads_1_1", [heads, 1, 1])],
                                 "row_head_shape", axis=0)
    return self.shared[key]

  def row_head_index(self, heads: int) -> str:
    """int64 [B, H, 1, 2] holding (b, h) at [b, h]: ScatterND's leading indices, built once."""
    key = f"row_head_index{heads}"
    if key not in self.shared:
      shape = self.row_head_shape(heads)
      batch = self.op("Squeeze", [self.op("Shape", ["token"], "batch_size_rows")], "batch")
      rows = self.op("Range", [self.const("zero_l", np.int64(0)), batch,
                               self.const("one_l", np.int64(1))], "rows")             # [B]
      rows = self.op("Expand", [self.op("Reshape", [rows, self.ints("shape", [-1, 1, 1, 1])],
                                        "rows4"), shape], "rows_bh")
      head = self.op("Expand", [self.const("heads_index", np.arange(heads, dtype=np.int64)
                                           .reshape(1, heads, 1, 1)), shape], "heads_bh")
      self.shared[key] = self.op("Concat", [rows, head], "row_head_index", axis=3)
    return self.shared[key]

  def op(self, op_type: str, inputs: Sequence[str], hint: str, outputs: int | Sequence[str] = 1,
         domain: str = "", **attributes: Any) -> Any:
    """Appends one node; returns its output name (or the list of names when several)."""
    names = ([self._name(f"{hint}_{i}") for i in range(outputs)] if isinstance(outputs, int)
             else list(outputs))
    self.nodes.append(self._helper.make_node(op_type, list(inputs), names, name=self._name(hint),
                                             domain=domain, **attributes))
    return names[0] if len(names) == 1 else names


def _numpy(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _rotate_half_columns(w: np.ndarray) -> np.ndarray:
  """Weights [..., K] whose products are (-x2, x1) where `w` gives (x1, x2) (half-split pairs)."""
  half = w.shape[-1] // 2
  return np.concatenate([-w[..., half:], w[..., :half]], axis=-1)


def _taylor_selection(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(left, right, weight) over a = [1, x] (dim + 1 entries) such that a[left] a[right] weight
  is `taylor_features(x)` in its order: 1, x / dim^(1/4), then x_i x_j w_ij for j >= i."""
  left, right, weight = [0], [0], [1.0]
  left += [0] * dim
  right += [1 + i for i in range(dim)]
  weight += [1.0 / dim ** 0.25] * dim
  for i in range(dim):
    for j in range(i, dim):
      left.append(1 + i)
      right.append(1 + j)
      weight.append((1.0 if i == j else math.sqrt(2.0)) / math.sqrt(2.0 * dim))
  return (np.asarray(left, np.int64), np.asarray(right, np.int64),
          np.asarray(weight, np.float64).astype(np.float32))


def _rms_norm(g: _Graph, x: str, norm: Any, hint: str) -> str:
  return g.op("RMSNormalization", [x, g.const(f"{hint}_scale", _numpy(norm.scale[...]))], hint,
              axis=-1, epsilon=float(norm.epsilon), stash_type=1)


def _dca_block(g: _Graph, x: str, block: Any, past: dict[str, str], present: dict[str, str],
               hint: str) -> str:
  """One pre-norm block with DCA attention (module docstring); returns the new residual."""
  layer = block.attn
  params = layer._params()  # pylint: disable=protected-access
  heads, head_dim = layer.num_heads, layer.head_dim
  window, slots = layer.window, layer.window + 1
  taylor = layer.feature_map is ops.FeatureMap.TAYLOR
  proj = params.feature.shape[-1]                        # P, the feature map's input size
  width = proj + 1 if taylor else proj                   # per head and q/k: [1, x] or x
  d_model = layer.d_model
  rotary = layer.rotary_base is not None

  h = _rms_norm(g, x, block.attn_norm, f"{hint}_attn_norm")
  if layer.short_conv:
    kernel = _numpy(layer.conv[...])                                          # [S_c, D]
    taps = g.op("Concat", [past["inputs"], g.op("Unsqueeze", [h, g.ints("axis1", [1])],
                                                  f"{hint}_conv_new")], f"{hint}_conv_taps",
                axis=1)                                                        # [B, S_c, D]
    h = g.op("ReduceSum", [g.op("Mul", [taps, g.const(f"{hint}_conv_kernel", kernel)],
                                f"{hint}_conv_mul"), g.ints("axis1", [1])], f"{hint}_conv",
             keepdims=0)
    g.op("Slice", [taps, g.ints("start", [1]), g.ints("end", [kernel.shape[0]]),
                   g.ints("axis", [1])], f"{hint}_conv_keep", outputs=[present["inputs"]])

  # The fused projection (module docstring), columns grouped per head so that every block
  # reshapes to [B, H, ., .] without a transpose.
  scale = np.float32(1.0 / math.sqrt(head_dim))
  wq, wk, wv = _numpy(params.query), _numpy(params.key), _numpy(params.value)   # [D, H, K]
  qk = np.stack([wq * scale, wk], axis=2)                                        # [D, H, 2, K]
  feature_in = np.stack([_numpy(jnp.einsum("dhk,hkp->dhp", params.query, params.feature)),
                         _numpy(jnp.einsum("dhk,hkp->dhp", params.key, params.feature))],
                        axis=2)                                                  # [D, H, 2, P]
  feature_bias = np.zeros((heads, 2, width), np.float32)
  if taylor:   # a leading column of zeros whose bias 1 makes a = [1, x]
    feature_in = np.concatenate([np.zeros_like(feature_in[..., :1]), feature_in], axis=-1)
    feature_bias[..., 0] = 1.0
  blocks = [qk.reshape(d_model, -1)]
  if rotary:   # adjacent to qk: one [B, 2, H, 2, K] view holds both
    blocks[0] = np.concatenate([qk, _rotate_half_columns(qk)], axis=1).reshape(d_model, -1)
  blocks += [wv.reshape(d_model, -1), feature_in.reshape(d_model, -1), _numpy(params.decay)]
  sizes = [b.shape[1] for b in blocks]
  bias = np.concatenate([np.zeros(sum(sizes[:-2]), np.float32), feature_bias.reshape(-1),
                         _numpy(params.decay_bias)])
  y = g.op("Gemm", [h, g.const(f"{hint}_w_fused", np.concatenate(blocks, axis=1)),
                    g.const(f"{hint}_b_fused", bias)], f"{hint}_fused")
  qk_flat, v_flat, feature_flat, rate = g.op("Split", [y, g.ints("sizes", sizes)],
                                             f"{hint}_split", outputs=len(sizes), axis=1)

  position = past["position"]
  if rotary:
    # rotary_phase: p * round(2^32 f / 2 pi) wraps modulo 2^32 (one turn) in int32; each
    # frequency twice, for the two halves of a pair. A quarter turn less (2^30, exact in the
    # phase) turns the cosine into the sine, so one Cos gives both: cs [2, 1, 1, K].
    freqs = float(layer.rotary_base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    turns = np.round((freqs / (2.0 * np.pi)) % 1.0 * 2.0 ** 32).astype(np.int64) % 2 ** 32
    step = np.where(turns >= 2 ** 31, turns - 2 ** 32, turns).astype(np.int32)
    phase = g.op("Add", [g.op("Mul", [position, g.const(f"{hint}_rotary_step", np.tile(step, 2),
                                                        np.int32)], f"{hint}_phase"),
                         g.const("quarter_turn", np.array([0, -2 ** 30], np.int32)
                                 .reshape(2, 1, 1, 1))], f"{hint}_phases")
    cs = g.op("Cos", [g.op("Mul", [g.op("Cast", [phase], f"{hint}_phase_f", to=1),
                                   g.const("turn", np.float32(2.0 * np.pi / 2.0 ** 32))],
                           f"{hint}_angle")], f"{hint}_cos_sin")
    both = g.op("Reshape", [qk_flat, g.ints("shape", [-1, 2, heads, 2, head_dim])], f"{hint}_qkr")
    qk4 = g.op("ReduceSum", [g.op("Mul", [both, cs], f"{hint}_qk_cs"), g.ints("axis1", [1])],
               f"{hint}_rotated", keepdims=0)                                    # [B, H, 2, K]
  else:
    qk4 = g.op("Reshape", [qk_flat, g.ints("shape", [-1, heads, 2, head_dim])], f"{hint}_qk")
  q, k = g.op("Split", [qk4, g.ints("sizes", [1, 1])], f"{hint}_q_k", outputs=2, axis=2)
  v = g.op("Reshape", [v_flat, g.ints("shape", [-1, heads, 1, head_dim])], f"{hint}_v")

  a = g.op("Reshape", [feature_flat, g.ints("shape", [-1, heads, 2, width])], f"{hint}_phi_in")
  if taylor:   # feature f = a[i_f] a[j_f] w_f, the products taken as taylor_features does
    left, right, weight = _taylor_selection(proj)
    pick = lambda index, name: g.op("Gather", [a, g.const(f"{hint}_phi_{name}", index)],
                                    f"{hint}_phi_{name}", axis=3)
    phi = g.op("Mul", [g.op("Mul", [pick(left, "left"), pick(right, "right")], f"{hint}_phi_xx"),
                       g.const(f"{hint}_phi_weight", weight)], f"{hint}_phi")
  else:   # elu(x) + 1
    phi = g.op("Add", [g.op("Elu", [a], f"{hint}_elu"), g.const("one", np.float32(1.0))],
               f"{hint}_phi")
  phi_q, phi_k = g.op("Split", [phi, g.ints("sizes", [1, 1])], f"{hint}_phi_q_k", outputs=2,
                      axis=2)                                                   # [B, H, 1, F]
  # exp(-softplus(z)) as JAX computes it: ONNX Runtime's Sigmoid(-z), equal in exact
  # arithmetic, is biased by ~5e-9 relative, which the memory's product of decays accumulates
  # (~1e-5 after 500 steps).
  log_decay = g.op("Neg", [g.op("Softplus", [rate], f"{hint}_softplus")], f"{hint}_log_decay")
  decay = g.op("Reshape", [g.op("Exp", [log_decay], f"{hint}_decay_flat"),
                           g.ints("shape", [-1, heads, 1, 1])], f"{hint}_decay")

  # The ring: slot t mod (W + 1) receives the token, slot (t + 1) mod (W + 1) holds the one
  # leaving. The write is a ScatterND (a copy and one [K]-row per head): ONNX Runtime's
  # broadcasting Where against a one-hot slot column costs ~3 ns an element, and a
  # ScatterElements takes one index per element where ScatterND copies whole rows.
  doc_start = past["doc_start"]
  g.op("Add", [position, g.const("one_i", np.int32(1))], f"{hint}_next",
       outputs=[present["position"]])
  g.op("Identity", [doc_start], f"{hint}_doc_start", outputs=[present["doc_start"]])
  ring = g.const("ring_slots", slots, np.int32)
  slot = g.op("Expand", [g.op("Reshape", [g.op("Cast", [g.op("Mod", [position, ring],
                                                              f"{hint}_slot")],
                                              f"{hint}_slot64", to=7),
                                        g.ints("shape", [1, 1, 1, 1])], f"{hint}_slot4"),
                         g.row_head_shape(heads)], f"{hint}_slot_bh")              # [B, H, 1, 1]
  index = g.op("Concat", [g.row_head_index(heads), slot], f"{hint}_ring_index",
               axis=3)                                                           # [B, H, 1, 3]
  leaving_slot = g.op("Mod", [present["position"], ring], f"{hint}_out_slot")

  def write(buffer, new, field):
    return g.op("ScatterND", [buffer, index, new], f"{hint}_{field}", outputs=[present[field]])

  keys = write(past["keys"], k, "keys")
  values = write(past["values"], v, "values")
  write(past["key_features"], phi_k, "key_features")

  # The leaving token's features and values, each selected to 0 unless it leaves (as
  # memory_state_update), then M <- a_t M + [phi v^T, phi].
  back = g.op("Sub", [position, g.const("window", np.int32(window))], f"{hint}_t_minus_w")
  leaving = g.op("GreaterOrEqual", [back, g.op("Max", [doc_start, g.const("zero_i", np.int32(0))],
                                               f"{hint}_doc_floor")], f"{hint}_leaving")
  leaving = g.op("Reshape", [leaving, g.ints("shape", [-1, 1, 1])], f"{hint}_leaving3")
  zero = g.const("zero", np.float32(0.0))
  old_phi = g.op("Where", [leaving, g.op("Gather", [past["key_features"], leaving_slot],
                                         f"{hint}_old_phi_row", axis=2), zero],
                 f"{hint}_old_phi_if")                                             # [B, H, F]
  old_v = g.op("Where", [leaving, g.op("Gather", [past["values"], leaving_slot],
                                       f"{hint}_old_v_row", axis=2), zero],
               f"{hint}_old_v_if")                                                 # [B, H, V]
  old_phi = g.op("Unsqueeze", [old_phi, g.ints("axis3", [3])], f"{hint}_old_phi")  # [B,H,F,1]
  old_v = g.op("Unsqueeze", [old_v, g.ints("axis2", [2])], f"{hint}_old_v")        # [B,H,1,V]
  update = g.op("Concat", [g.op("Mul", [old_phi, old_v], f"{hint}_outer"), old_phi],
                f"{hint}_update", axis=-1)                                       # [B, H, F, V+1]
  memory = g.op("Add", [g.op("Mul", [decay, past["memory"]], f"{hint}_decayed"), update],
                f"{hint}_memory", outputs=[present["memory"]])

  # The slots the query sees (`step_slots`): offset r_s >= max(1, doc_start - (t - W)).
  offset = g.op("Gather", [g.const("ring_offsets", (np.arange(slots)[None, :]
                                                    - np.arange(slots)[:, None]) % slots,
                                   np.int32), leaving_slot], f"{hint}_offsets", axis=0)  # [slots]
  least = g.op("Max", [g.op("Sub", [doc_start, back], f"{hint}_doc_offset"),
                       g.const("one_i", np.int32(1))], f"{hint}_least")
  seen = g.op("GreaterOrEqual", [offset, g.op("Reshape", [least, g.ints("shape", [-1, 1, 1, 1])],
                                              f"{hint}_least4")], f"{hint}_seen")  # [B,1,1,slots]
  scores = g.op("MatMul", [q, g.op("Transpose", [keys], f"{hint}_keys_t", perm=[0, 1, 3, 2])],
                f"{hint}_scores")                                                # [B, H, 1, slots]
  scores = g.op("Where", [seen, scores, g.const("minus_inf", np.float32(-np.inf))],
                f"{hint}_scores_seen")

  # The memory as one more softmax entry: score log Z, value N / Z. An empty memory has Z = 0
  # (its features are positive, so Z > 0 once anything is stored): Log gives -inf, a weight of
  # 0, and N / 1 = 0 its value, as combine_memories selects.
  read = g.op("MatMul", [phi_q, memory], f"{hint}_read")                         # [B, H, 1, V+1]
  num, den = g.op("Split", [read, g.ints("sizes", [head_dim, 1])], f"{hint}_read_split",
                  outputs=2, axis=-1)
  safe = g.op("Where", [g.op("LessOrEqual", [den, zero], f"{hint}_empty"),
                        g.const("one", np.float32(1.0)), den], f"{hint}_safe_den")
  log_den = g.op("Log", [den], f"{hint}_memory_score")
  mean = g.op("Div", [num, safe], f"{hint}_memory_value")
  weights = g.op("Softmax", [g.op("Concat", [scores, log_den], f"{hint}_all_scores", axis=-1)],
                 f"{hint}_weights", axis=-1)
  o = g.op("MatMul", [weights, g.op("Concat", [values, mean], f"{hint}_all_values", axis=2)],
           f"{hint}_o")                                                          # [B, H, 1, V]
  o = g.op("Reshape", [o, g.ints("shape", [-1, heads * head_dim])], f"{hint}_o_flat")
  o = g.op("MatMul", [o, g.const(f"{hint}_w_out", _numpy(layer.out.kernel[...]))],
           f"{hint}_attn_out")
  x = g.op("Add", [x, o], f"{hint}_attn_residual")

  mlp = block.mlp
  n = _rms_norm(g, x, block.mlp_norm, f"{hint}_mlp_norm")
  gate = g.op("MatMul", [n, g.const(f"{hint}_w_gate", _numpy(mlp.gate.kernel[...]))],
              f"{hint}_gate")
  up = g.op("MatMul", [n, g.const(f"{hint}_w_up", _numpy(mlp.up.kernel[...]))], f"{hint}_up")
  silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{hint}_gate_sigmoid")], f"{hint}_silu")
  down = g.op("MatMul", [g.op("Mul", [silu, up], f"{hint}_glu"),
                         g.const(f"{hint}_w_down", _numpy(mlp.down.kernel[...]))], f"{hint}_down")
  return g.op("Add", [x, down], f"{hint}_mlp_residual")


def decode_step_model(model: Any, max_length: int, *, batch: int | str = "B",
                      opset: int = 23) -> Any:
  """`model.decode_step` as an ONNX model, written from the maths (module docstring).

  Args:
    model: a `TransformerLM` that `unsupported_reason` accepts.
    max_length: L of the cache layout (DCA's cache does not depend on it).
    batch: "B" (symbolic: any batch size runs) or a fixed batch size.
    opset: the ONNX opset, >= 23 (RMSNormalization).

  Returns:
    An `onnx.ModelProto` with `export.io_names` inputs and outputs, checked by `onnx.checker`.

  Raises:
    ValueError: a model the builder does not write (naming what), a batch that is neither "B"
      nor an integer >= 1, or an opset below 23.

  Example:
    >>> from flax import nnx
    >>> from dca_jax.nn import TransformerConfig, TransformerLM
    >>> model = TransformerLM(TransformerConfig(d_model=32, num_layers=1, num_heads=2,
    ...                                         attention_options={"window": 8}), rngs=nnx.Rngs(0))
    >>> proto = decode_step_model(model, max_length=64)
    >>> [i.name for i in proto.graph.input][:2], len(proto.graph.node) < 100
    (['token', 'past.layer0.state.keys'], True)
  """
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import TensorProto, helper  # pylint: disable=import-outside-toplevel

  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel

  reason = unsupported_reason(model)
  if reason is not None:
    raise ValueError(f"the ONNX graph builder does not write this model's decode step: {reason}.")
  if batch != "B" and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
    raise ValueError(f"batch must be 'B' (symbolic) or an integer >= 1, got {batch!r}.")
  if not isinstance(opset, int) or opset < 23:
    raise ValueError(f"opset must be an integer >= 23 (RMSNormalization), got {opset!r}.")
  layout = export_lib.cache_layout(model, max_length)
  in_names, out_names = export_lib.io_names(layout, prefill=False)
  elem = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32, "bool": TensorProto.BOOL}
  config = model.config
  g = _Graph()

  # The embedding as jnp.take's "fill" mode gives it: ids in [-V, V) (negative ones wrap, as
  # ONNX's Gather does), NaN rows for the others; pre-scaled by sqrt(D) (the same product).
  vocab, d_model = config.vocab_size, config.d_model
  table = _numpy(model.embed.embedding[...])
  token = in_names[0]
  clipped = g.op("Clip", [token, g.const("id_low", np.int32(-vocab)),
                          g.const("id_high", np.int32(vocab - 1))], "token_clipped")
  rows = g.op("Gather", [g.const("embedding_scaled", table * np.float32(math.sqrt(d_model))),
                         clipped], "embed", axis=0)
  valid = g.op("Unsqueeze", [g.op("Equal", [clipped, token], "token_valid"), g.ints("axis1", [1])],
               "token_valid_column")
  x = g.op("Where", [valid, rows, g.const("nan", np.float32(np.nan))], "embedded")

  for i, block in enumerate(model.blocks):
    prefix = f"layer{i}."
    fields = {e.name[len(prefix):].split(".")[-1]: e.name for e in layout
              if e.name.startswith(prefix)}
    past = {f: export_lib.PAST + n for f, n in fields.items()}
    present = {f: export_lib.PRESENT + n for f, n in fields.items()}
    x = _dca_block(g, x, block, past, present, f"layer{i}")

  n = _rms_norm(g, x, model.final_norm, "final_norm")
  head = table.T if model.head is None else _numpy(model.head.kernel[...])
  g.op("MatMul", [n, g.const("head", head)], "head", outputs=["logits"])

  def info(name, entry_shape, dtype):
    shape = [batch if d == "B" else d for d in entry_shape]
    return helper.make_tensor_value_info(name, elem[dtype], shape)

  inputs = [info(token, ("B",), "int32")]
  inputs += [info(n, e.shape, e.dtype) for n, e in zip(in_names[1:], layout)]
  outputs = [info("logits", ("B", vocab), "float32")]
  outputs += [info(n, e.shape, e.dtype) for n, e in zip(out_names[1:], layout)]
  graph = helper.make_graph(g.nodes, f"{config.attention}_decode_step", inputs, outputs,
                            initializer=g.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                            producer_name="dca_jax.nn.onnx_graph")
  onnx.checker.check_model(proto, full_check=True)
  return proto
