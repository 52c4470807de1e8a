"""A `TransformerLM`'s prefill and decode step as pure functions of named arrays, for export.

Runtimes outside JAX (ONNX Runtime, a StableHLO consumer) see neither pytrees nor modules: a
program there is a list of arrays in and a list of arrays out. This module turns a model into
two such programs, with the parameters baked in as constants and the decode cache flattened
into named arrays that go in and come back out:

    decode_step(token [B] int32, *cache) -> (logits [B, V] float32, *new_cache)
    prefill(tokens [B, P] int32, *cache) -> (logits [B, P, V] float32, *new_cache)

`cache_layout` names the arrays (e.g. "layer0.state.keys"), gives their shapes with the batch
axis marked "B", their dtypes and the value `init_cache` fills them with (every cache of the
registry starts as constant arrays: zeros, or -1 for DCA's empty window slots), so a runtime can
build the empty cache from the layout alone. Only softmax attention's cache depends on
`max_length`; the others are constant in size.

Two exporters:
  * `export_stablehlo`: `jax.export` (serialised StableHLO, run back with `jax.export.deserialize`),
  * `export_onnx`: jax2onnx (the optional `[export]` extra), checked by loading it in ONNX Runtime.
Both try a symbolic batch size first and fall back to a fixed one when the layer's code needs a
concrete batch (softmax attention sizes its score matrix from it); `ExportResult` says which.
A conversion that fails raises an error naming the attention layer and the JAX primitive.

Notation: B batch, P prefill length, V vocabulary size, L max_length.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from dca_jax.nn import TransformerConfig, TransformerLM
  >>> model = TransformerLM(TransformerConfig(d_model=32, num_layers=1, num_heads=2,
  ...                                         attention="window",
  ...                                         attention_options={"window": 8}), rngs=nnx.Rngs(0))
  >>> [(e.name, e.shape) for e in cache_layout(model, max_length=64)][:2]
  [('layer0.k', ('B', 2, 8, 16)), ('layer0.v', ('B', 2, 8, 16))]
  >>> step = decode_step_function(model, max_length=64)
  >>> cache = init_cache_arrays(cache_layout(model, 64), batch_size=2)
  >>> logits, *cache = step(jnp.array([1, 2], jnp.int32), *cache)
  >>> logits.shape
  (2, 256)
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from dca_jax.ops import _checks

# Prefixes of the ONNX input and output names of the cache arrays (an ONNX graph needs distinct
# names for what comes in and what goes out).
PAST, PRESENT = "past.", "present."


@dataclasses.dataclass(frozen=True)
class CacheEntry:
  """One array of a flattened decode cache.

  Attributes:
    name: a dotted path, "layer<i>." then the cache's field names (e.g. "layer0.state.memory").
    shape: the shape, with the string "B" at the batch axis.
    dtype: the NumPy dtype name ("float32", "int32", "bool").
    fill: the value every element has in an empty cache (from `init_cache`).
    batch_axis: the index of "B" in `shape`, or None for a per-model scalar (position counters).
  """

  name: str
  shape: tuple[int | str, ...]
  dtype: str
  fill: float | int | bool
  batch_axis: int | None

  def concrete_shape(self, batch_size: int) -> tuple[int, ...]:
    """The shape with "B" replaced by `batch_size`."""
    return tuple(batch_size if d == "B" else d for d in self.shape)

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "fill": self.fill, "batch_axis": self.batch_axis}


def _path_name(path: Sequence[Any]) -> str:
  """'layer<i>.field.field' from a tree path into the tuple of per-layer caches."""
  parts = []
  for i, key in enumerate(path):
    if isinstance(key, jax.tree_util.SequenceKey):
      parts.append(f"layer{key.idx}" if i == 0 else str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return ".".join(parts)


def _check_model(model: Any) -> None:
  for name in ("init_cache", "prefill", "decode_step", "config"):
    if not hasattr(model, name):
      raise TypeError(f"model must be a TransformerLM (with init_cache, prefill, decode_step and "
                      f"config), got {type(model).__name__} without {name!r}.")


def cache_layout(model: Any, max_length: int) -> tuple[CacheEntry, ...]:
  """The flattened decode cache of `model.init_cache(B, max_length)`, in flattening order.

  Args:
    model: a `TransformerLM`.
    max_length: L, the most tokens the cache holds (only softmax attention's depends on it).

  Returns:
    One `CacheEntry` per array, in the order of `jax.tree_util.tree_leaves(cache)`.

  Raises:
    TypeError: model is not a `TransformerLM`.
    ValueError: max_length not an integer >= 1, or a cache array that `init_cache` does not fill
      with one constant (a runtime could not build it from the layout).
  """
  _check_model(model)
  _checks.check_positive_int("max_length", max_length)
  one = jax.tree_util.tree_leaves_with_path(model.init_cache(1, max_length))
  two = jax.tree_util.tree_leaves(jax.eval_shape(lambda: model.init_cache(2, max_length)))
  entries = []
  for (path, a), b in zip(one, two):
    name = _path_name(path)
    axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    batch_axis = axes[0] if axes else None
    shape = tuple("B" if i == batch_axis else d for i, d in enumerate(a.shape))
    values = np.asarray(a)
    if values.size and not (values == values.flat[0]).all():
      raise ValueError(f"cache array {name!r} of attention {model.config.attention!r} is not "
                       f"filled with one constant by init_cache, so its empty value cannot be "
                       f"described by a layout.")
    fill = values.flat[0].item() if values.size else 0
    entries.append(CacheEntry(name, shape, values.dtype.name, fill, batch_axis))
  return tuple(entries)


def init_cache_arrays(layout: Sequence[CacheEntry], batch_size: int) -> list[np.ndarray]:
  """The empty cache of `layout` for `batch_size` rows, as NumPy arrays (what `init_cache` gives).

  Raises:
    ValueError: batch_size not an integer >= 1.
  """
  _checks.check_positive_int("batch_size", batch_size)
  return [np.full(e.concrete_shape(batch_size), e.fill, dtype=np.dtype(e.dtype)) for e in layout]


def _treedef(model: Any, max_length: int) -> Any:
  return jax.tree_util.tree_structure(jax.eval_shape(lambda: model.init_cache(1, max_length)))


def decode_step_function(model: Any, max_length: int) -> Callable[..., tuple[jax.Array, ...]]:
  """`model.decode_step` as a function of arrays: (token [B], *cache) -> (logits [B, V], *cache).

  The parameters are closed over (constants of the exported program); the cache arrays follow
  `cache_layout(model, max_length)`.

  Raises:
    TypeError: model is not a `TransformerLM`.
    ValueError: max_length not an integer >= 1.
  """
  return _array_function(model, max_length, "decode_step")


def prefill_function(model: Any, max_length: int) -> Callable[..., tuple[jax.Array, ...]]:
  """`model.prefill` as a function of arrays: (tokens [B, P], *cache) -> (logits [B, P, V], *cache).

  Raises:
    TypeError: model is not a `TransformerLM`.
    ValueError: max_length not an integer >= 1.
  """
  return _array_function(model, max_length, "prefill")


def _program(model: Any, max_length: int, prefill_length: int | None, fallback_batch: int):
  """(the array function, its cache layout, "decode step" or "prefill") of one exported program,
  after checking the lengths."""
  fn = (decode_step_function(model, max_length) if prefill_length is None
        else prefill_function(model, max_length))
  layout = cache_layout(model, max_length)
  if prefill_length is not None:
    _checks.check_positive_int("prefill_length", prefill_length)
  _checks.check_positive_int("fallback_batch", fallback_batch)
  return fn, layout, "decode step" if prefill_length is None else "prefill"


def _array_function(model: Any, max_length: int, method: str) -> Callable[..., tuple[jax.Array, ...]]:
  """`model.<method>(x, cache)` as (x, *cache arrays) -> (logits, *new cache arrays)."""
  _check_model(model)
  _checks.check_positive_int("max_length", max_length)
  treedef = _treedef(model, max_length)

  def function(x, *cache):
    cache = [jnp.asarray(c) for c in cache]
    logits, new_cache = getattr(model, method)(x, jax.tree_util.tree_unflatten(treedef, cache))
    return (logits, *jax.tree_util.tree_leaves(new_cache))

  function.__name__ = method
  return function


def input_specs(layout: Sequence[CacheEntry], batch: int | Any,
                prefill_length: int | None = None) -> list[jax.ShapeDtypeStruct]:
  """Input shapes of the decode step (prefill_length None) or of the prefill.

  Args:
    layout: from `cache_layout`.
    batch: a concrete batch size, or a symbolic dimension (`jax.export.symbolic_shape("B")[0]`
      for `jax.export`, the string "B" for jax2onnx).
    prefill_length: P for the prefill's [B, P] tokens; None: the decode step's [B] token.
  """
  tokens = (batch,) if prefill_length is None else (batch, prefill_length)
  specs = [jax.ShapeDtypeStruct(tokens, jnp.int32)]
  for e in layout:
    shape = tuple(batch if d == "B" else d for d in e.shape)
    specs.append(jax.ShapeDtypeStruct(shape, jnp.dtype(e.dtype)))
  return specs


def io_names(layout: Sequence[CacheEntry], prefill: bool) -> tuple[list[str], list[str]]:
  """(input names, output names) of an exported program: "token"/"tokens" and "past.<name>" in,
  "logits" and "present.<name>" out."""
  return ([("tokens" if prefill else "token")] + [PAST + e.name for e in layout],
          ["logits"] + [PRESENT + e.name for e in layout])


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """An exported program and how it was made.

  Attributes:
    data: the serialised program (StableHLO bytes from `jax.export`, or an ONNX model's bytes).
    batch: "B" (symbolic: any batch size runs) or the fixed batch size it was exported for.
    fallback_reason: why the batch is fixed (the symbolic export's error), or None.
    converter: what wrote it: "jax2onnx", "graph" (`onnx_graph`) or, for StableHLO, "jax.export".
  """

  data: bytes
  batch: int | str
  fallback_reason: str | None = None
  converter: str = "jax2onnx"


def _primitives(jaxpr: Any) -> list[str]:
  """Names of the primitives of a jaxpr and of every jaxpr nested in its equations' params."""
  names: list[str] = []

  def visit(j):
    for eqn in j.eqns:
      names.append(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            visit(inner)

  visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
  return list(dict.fromkeys(names))


def _failing_primitive(error: BaseException) -> str | None:
  """The primitive a converter was lowering when it raised (its innermost `eqn`), if any."""
  match = re.search(r"primitive '([^']+)'", str(error))
  if match:
    return match.group(1)
  found, tb = None, error.__traceback__
  while tb is not None:
    eqn = tb.tb_frame.f_locals.get("eqn")
    name = getattr(getattr(eqn, "primitive", None), "name", None)
    if isinstance(name, str):
      found = name
    tb = tb.tb_next
  return found


def _layer_name(model: Any) -> str:
  attention = model.config.attention
  layer = type(model.blocks[0].attn).__name__ if len(model.blocks) else "?"
  return f"attention {attention!r} ({layer})"


def _is_shape_error(error: BaseException) -> bool:
  """A failure caused by a symbolic dimension (the code needs a concrete batch size)."""
  names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
  return bool(names & {"InconclusiveDimensionOperation"}) or "symbolic" in str(error).lower()


def export_stablehlo(model: Any, max_length: int, *, prefill_length: int | None = None,
                     fallback_batch: int = 1, symbolic_batch: bool = True) -> ExportResult:
  """The decode step (prefill_length None) or the prefill as serialised StableHLO (`jax.export`).

  Run it back with `jax.export.deserialize(result.data).call(token_or_tokens, *cache)`.

  Args:
    model: a `TransformerLM`.
    max_length: L of the cache (see `cache_layout`).
    prefill_length: P, the prefill's fixed number of tokens; None exports the decode step.
    fallback_batch: the fixed batch size used when a symbolic one does not trace.
    symbolic_batch: try a symbolic batch size first.

  Returns:
    An `ExportResult`.

  Raises:
    ValueError: naming the layer and the primitive, when `jax.export` fails for another reason
      than the symbolic batch.
  """
  fn, layout, what = _program(model, max_length, prefill_length, fallback_batch)
  reason = None
  if symbolic_batch:
    batch = jax.export.symbolic_shape("B")[0]
    try:
      exported = jax.export.export(jax.jit(fn))(*input_specs(layout, batch, prefill_length))
      return ExportResult(bytes(exported.serialize()), "B", None, "jax.export")
    except Exception as e:  # noqa: BLE001  (any tracing failure: retry with a fixed batch)
      if not _is_shape_error(e):
        raise ValueError(f"jax.export of the {what} failed for {_layer_name(model)} at primitive "
                         f"{_failing_primitive(e)!r}: {type(e).__name__}: {e}") from e
      reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
  try:
    exported = jax.export.export(jax.jit(fn))(*input_specs(layout, fallback_batch, prefill_length))
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"jax.export of the {what} failed for {_layer_name(model)} at primitive "
                     f"{_failing_primitive(e)!r}: {type(e).__name__}: {e}") from e
  return ExportResult(bytes(exported.serialize()), fallback_batch, reason, "jax.export")


def _pad_without_interior(x: jax.Array, padding_value: jax.Array,
                           padding_config: Sequence[tuple[int, int, int]]) -> jax.Array:
  """`lax.pad` as concatenates, reshapes and slices: ONNX's Pad has no interior padding (which
  `lax.associative_scan` uses to interleave its halves), and jax2onnx's Pad needs a constant
  batch size."""
  value = padding_value.astype(x.dtype)

  def fill(shape):
    return jnp.broadcast_to(value, tuple(shape))

  for axis, (low, high, interior) in enumerate(padding_config):
    size = x.shape[axis]
    if interior and size > 1:
      expanded = jnp.expand_dims(x, axis + 1)                     # [..., n, 1, ...]
      gap = list(expanded.shape)
      gap[axis + 1] = interior
      woven = jnp.concatenate([expanded, fill(gap)], axis=axis + 1)
      shape = list(x.shape)
      shape[axis] = size * (1 + interior)
      x = jax.lax.slice_in_dim(woven.reshape(tuple(shape)), 0, shape[axis] - interior, axis=axis)
    for amount, at_end in ((low, False), (high, True)):
      length = x.shape[axis]
      if amount < 0:
        x = (jax.lax.slice_in_dim(x, 0, length + amount, axis=axis) if at_end
             else jax.lax.slice_in_dim(x, -amount, length, axis=axis))
      elif amount > 0:
        edge = list(x.shape)
        edge[axis] = amount
        x = jnp.concatenate([x, fill(edge)] if at_end else [fill(edge), x], axis=axis)
  return x


# Primitives whose body is evaluated in place, and the params that hold the body.
_INLINED = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                      "custom_vjp_call", "custom_vjp_call_jaxpr"})
_CALL_JAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _interpret(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates a jaxpr equation by equation, as `jax.core.eval_jaxpr`, with the rewrites ONNX
  needs: jit calls and custom-derivative calls inlined (so nothing inside them escapes the
  rewrites), interior padding replaced (`_pad_without_interior`) and empty pieces dropped from
  concatenations. Other higher-order
  primitives (scan, while, cond) are bound as they are."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    inner = next((eqn.params[k] for k in _CALL_JAXPRS if k in eqn.params), None)
    if name in _INLINED and inner is not None:
      # An exported program is never differentiated: custom derivative rules can go.
      if hasattr(inner, "consts"):
        outs = _interpret(inner.jaxpr, inner.consts, *invals)
      else:
        outs = _interpret(inner, (), *invals)
    elif name == "pad":
      outs = [_pad_without_interior(invals[0], invals[1], eqn.params["padding_config"])]
    elif name == "concatenate" and any(x.shape[eqn.params["dimension"]] == 0 for x in invals):
      # Empty pieces (e.g. x[:, :0]) confuse jax2onnx's shape bookkeeping; they add nothing.
      axis = eqn.params["dimension"]
      kept = [x for x in invals if x.shape[axis] != 0] or invals[:1]
      outs = [kept[0] if len(kept) == 1 else jax.lax.concatenate(kept, axis)]
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def onnx_friendly(fn: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct]
                  ) -> Callable[..., tuple[Any, ...]]:
  """`fn` traced once to a jaxpr (of `lax` primitives) and replayed with the rewrites of
  `_interpret`; outputs that are inputs unchanged get a new value (an ONNX graph cannot name one
  value both as an input and as an output).

  Tracing here, outside the converter, also keeps its own re-implementations of `jax.numpy`
  functions out of the graph (jax2onnx 0.17's `jnp.where` turns `where(c, 0, x_f32)` into
  float64). `specs` may hold symbolic dimensions; the returned function must then be traced with
  the same ones.
  """
  closed = jax.make_jaxpr(fn)(*specs)
  jaxpr = closed.jaxpr
  passthrough = [v in jaxpr.invars for v in jaxpr.outvars]

  def replay(*args):
    outs = _interpret(jaxpr, closed.consts, *args)
    fresh = []
    for out, same in zip(outs, passthrough):
      # Also an input passed through a jit call that `_interpret` inlined: the very same value.
      if same or any(out is a for a in args):
        out = jnp.logical_or(out, False) if out.dtype == jnp.bool_ else out + jnp.zeros((), out.dtype)
      fresh.append(out)
    return tuple(fresh)

  return replay


def _onnx_error(model: Any, what: str, fn: Callable, specs: list, error: BaseException,
                registry: Any) -> Exception:
  """A NotImplementedError (no converter for a primitive) or ValueError naming layer and
  primitive."""
  primitive = _failing_primitive(error)
  try:
    used = _primitives(jax.make_jaxpr(fn)(*specs))
    missing = [p for p in used if p not in registry]
  except Exception:  # noqa: BLE001  (the symbolic batch may not trace at all)
    missing = []
  layer = _layer_name(model)
  if isinstance(error, NotImplementedError) or (primitive and primitive in missing):
    return NotImplementedError(
        f"ONNX export of the {what} is not supported for {layer}: jax2onnx has no conversion "
        f"for primitive {primitive!r} (primitives without one: {missing}). Original error: "
        f"{type(error).__name__}: {error}")
  return ValueError(f"ONNX export of the {what} failed for {layer} at primitive {primitive!r}: "
                    f"{type(error).__name__}: {error}")


def _float64_tensors(proto: Any) -> list[str]:
  """Names of float64 values in an ONNX graph (its subgraphs included)."""
  import onnx  # pylint: disable=import-outside-toplevel

  double = onnx.TensorProto.DOUBLE
  found: list[str] = []

  def visit(graph):
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
      if v.type.tensor_type.elem_type == double:
        found.append(v.name)
    for t in graph.initializer:
      if t.data_type == double:
        found.append(t.name)
    for node in graph.node:
      if node.op_type == "Cast" and any(a.name == "to" and a.i == double for a in node.attribute):
        found.append(node.output[0])
      for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == double:
          found.append(f"{node.output[0]} ({node.op_type}.{a.name})")
        if a.type == onnx.AttributeProto.GRAPH:
          visit(a.g)
        for g in a.graphs:
          visit(g)

  visit(proto.graph)
  return found


# Initializers at least this large whose elements are all equal are written as ConstantOfShape.
UNIFORM_CONSTANT_MIN_BYTES = 4096


def _fillable_types() -> frozenset[int]:
  """ONNX element types that ConstantOfShape fills in every opset the exporter uses (>= 17) and
  ONNX Runtime runs: bool, the integers, float16/32/64 (not bfloat16: opset 20; not float8 or
  int4: no kernel)."""
  from onnx import TensorProto  # pylint: disable=import-outside-toplevel
  return frozenset(getattr(TensorProto, name) for name in (
      "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
      "FLOAT16", "FLOAT", "DOUBLE"))


def uniform_constants_as_nodes(proto: Any, min_bytes: int = UNIFORM_CONSTANT_MIN_BYTES) -> int:
  """Rewrites, in place, every initializer of `proto`'s main graph of >= `min_bytes` whose
  elements are bit for bit equal (so -0.0 and 0.0, or NaNs with other payloads, are not merged)
  as a ConstantOfShape node of the same name, shape, dtype and value; returns the bytes removed
  from the file. Only the element types of `_fillable_types`; graph inputs are left alone.

  jax2onnx writes the zeros, -inf and NaN fills of a traced program (`jnp.zeros`, the masks'
  `where(mask, x, -inf)`, padding) as full-size tensors: the demo-size DCA model's prefill at
  batch 8 x 256 tokens was 42.3 MiB with them and is 2.61 MiB without (docs/edge.md at commit
  d83439d and since 2026-12-05 22:00 UTC). ConstantOfShape computes the same tensor at run time
  from its shape alone.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel

  fillable = _fillable_types()
  graph = proto.graph
  inputs = {v.name for v in graph.input}
  taken = inputs | {t.name for t in graph.initializer} | {
      name for node in graph.node for name in list(node.output) + [node.name]}

  def fresh(name: str) -> str:       # a name the graph does not use yet (it may be re-run)
    candidate, i = name, 0
    while candidate in taken:
      i += 1
      candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate

  keep, nodes, removed = [], [], 0
  for tensor in graph.initializer:
    uniform = False
    if tensor.data_type in fillable and tensor.name not in inputs:
      array = numpy_helper.to_array(tensor)
      bits = array.reshape(-1).view(f"u{array.dtype.itemsize}")    # -0.0 != 0.0, NaN payloads
      uniform = array.nbytes >= min_bytes and bits.size > 0 and bool((bits == bits[0]).all())
    if not uniform:
      keep.append(tensor)
      continue
    removed += array.nbytes
    shape_name = fresh(f"{tensor.name}__shape")
    nodes.append(helper.make_node(
        "Constant", [], [shape_name], name=fresh(f"{tensor.name}__shape_node"),
        value=numpy_helper.from_array(np.asarray(array.shape, np.int64), shape_name)))
    nodes.append(helper.make_node(
        "ConstantOfShape", [shape_name], [tensor.name], name=fresh(f"{tensor.name}__fill"),
        value=numpy_helper.from_array(array.reshape(-1)[:1].copy(), f"{tensor.name}__value")))
  if removed:
    del graph.initializer[:]
    graph.initializer.extend(keep)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)       # before every use: the graph stays sorted
    onnx.checker.check_model(proto)
  return removed


class OnnxConverter(str, enum.Enum):
  """How `export_onnx` writes a program."""

  AUTO = "auto"            # the graph builder where it applies, else jax2onnx
  GRAPH = "graph"          # `onnx_graph.decode_step_model` only: DCA's decode step
  JAX2ONNX = "jax2onnx"    # jax2onnx, any layer and program

  @classmethod
  def parse(cls, value: "OnnxConverter | str") -> "OnnxConverter":
    return _checks.parse_choice(cls, value, "converter")


def _jax2onnx_proto(model: Any, fn: Callable, layout: Sequence[CacheEntry], what: str,
                    prefill_length: int | None, fallback_batch: int, symbolic_batch: bool,
                    opset: int) -> tuple[Any, int | str, str | None]:
  """(ONNX model, batch, fallback reason) of `fn` converted by jax2onnx, a symbolic batch first."""
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("export_onnx needs jax2onnx, onnx and onnxruntime: "
                      "pip install -e '.[export]'.") from e
  in_names, out_names = io_names(layout, prefill_length is not None)

  def convert(batch):
    dim = jax.export.symbolic_shape("B")[0] if batch == "B" else batch
    specs = input_specs(layout, dim, prefill_length)
    try:
      friendly = onnx_friendly(fn, specs)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"tracing the {what} of {_layer_name(model)} for ONNX failed at primitive "
                       f"{_failing_primitive(e)!r}: {type(e).__name__}: {e}") from e
    name = f"{model.config.attention}_{what.replace(' ', '_')}"
    previous = logging.getLogger("onnx_ir").level
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)   # per-value type notes, not errors
    try:
      return jax2onnx.to_onnx(friendly, specs, model_name=name, opset=opset,
                              input_names=in_names, output_names=out_names)
    except Exception as e:  # noqa: BLE001
      raise _onnx_error(model, what, fn, input_specs(layout, 1, prefill_length), e,
                        PLUGIN_REGISTRY) from e
    finally:
      logging.getLogger("onnx_ir").setLevel(previous)

  reason = None
  batch: int | str = "B" if symbolic_batch else fallback_batch
  try:
    proto = convert(batch)
  except Exception as e:  # noqa: BLE001  (a symbolic batch failed: a fixed one instead)
    if batch != "B":
      raise
    reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    batch = fallback_batch
    proto = convert(batch)
  return proto, batch, reason


def export_onnx(model: Any, max_length: int, *, prefill_length: int | None = None,
                fallback_batch: int = 1, symbolic_batch: bool = True,
                opset: int = 23, converter: OnnxConverter | str = "auto") -> ExportResult:
  """The decode step (prefill_length None) or the prefill as an ONNX model.

  Inputs are named "token" ([B] int32; "tokens" [B, P] for the prefill) and "past.<cache name>",
  outputs "logits" and "present.<cache name>" (`io_names`). The model is loaded once in ONNX
  Runtime before it is returned, so a graph the runtime rejects fails here, and it is checked to
  hold no float64 tensor (the exporter must not change the model's float32 numerics).

  Two converters: the graph builder (`dca_jax.nn.onnx_graph`), which writes DCA's decode step
  from the model's maths in ~85 ONNX nodes per layer (jax2onnx: ~680-840), and jax2onnx (the
  optional `[export]` extra), which converts any layer's decode step or prefill from its jaxpr.
  "auto" takes the builder where `onnx_graph.unsupported_reason` accepts the model and the
  program is the decode step; both write the same inputs, outputs and cache layout.

  Args:
    model, max_length, prefill_length, fallback_batch, symbolic_batch: see `export_stablehlo`.
    opset: the ONNX opset (the graph builder needs >= 23).
    converter: "auto", "graph" or "jax2onnx" (see above).

  Returns:
    An `ExportResult` with the serialised ONNX model.

  Raises:
    ImportError: onnx / onnxruntime (or, for jax2onnx, jax2onnx) are not installed
      (`pip install dca_jax[export]`).
    NotImplementedError: naming the layer and the primitive jax2onnx cannot convert.
    ValueError: naming the layer and the primitive, for any other failed conversion, a graph
      ONNX Runtime rejects, float64 values in the graph, an unknown converter, or
      converter="graph" for a program the builder does not write (saying why).
  """
  converter = OnnxConverter.parse(converter)
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("export_onnx needs onnx and onnxruntime (and jax2onnx for layers the "
                      "graph builder does not write): pip install -e '.[export]'.") from e
  from dca_jax.nn import onnx_graph  # pylint: disable=import-outside-toplevel
  fn, layout, what = _program(model, max_length, prefill_length, fallback_batch)
  unsupported = ("the graph builder writes the decode step only" if prefill_length is not None
                 else onnx_graph.unsupported_reason(model))
  if converter is OnnxConverter.GRAPH and unsupported is not None:
    raise ValueError(f"converter='graph' cannot export the {what} of {_layer_name(model)}: "
                     f"{unsupported}; use converter='auto' or 'jax2onnx'.")
  if converter is not OnnxConverter.JAX2ONNX and unsupported is None:
    batch: int | str = "B" if symbolic_batch else fallback_batch
    proto, reason, used = onnx_graph.decode_step_model(model, max_length, batch=batch,
                                                       opset=opset), None, "graph"
  else:
    proto, batch, reason = _jax2onnx_proto(model, fn, layout, what, prefill_length,
                                           fallback_batch, symbolic_batch, opset)
    used = "jax2onnx"
  doubles = _float64_tensors(proto)          # before the rewrite below turns fills into nodes
  if doubles:
    raise ValueError(f"ONNX export of the {what} for {_layer_name(model)} holds float64 values "
                     f"(e.g. {doubles[:3]}): a converter promoted float32 arithmetic.")
  if used == "jax2onnx":
    uniform_constants_as_nodes(proto)
  data = proto.SerializeToString()
  try:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # noqa: BLE001
    node = re.search(r"Node \(([^)]*)\) Op \(([^)]*)\)", str(e))
    where = f" (ONNX node {node.group(1)}, op {node.group(2)})" if node else ""
    raise ValueError(f"ONNX Runtime rejects the exported {what} of {_layer_name(model)}{where}: "
                     f"{e}") from e
  return ExportResult(data, batch, reason, used)
