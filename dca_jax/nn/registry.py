"""The one list of attention layers: name -> layer class + its typed options.

Everything that chooses an attention layer by name (`TransformerConfig`, the experiment configs,
the suite, the benchmarks, the layer contract tests) reads `LAYERS`; a layer added here is
picked up by all of them.

A layer's options are the keyword arguments of its constructor beyond the shared ones
(d_model, num_heads, rngs, dtype, param_dtype). `LayerSpec.options` is a frozen dataclass built
from that signature, so the defaults are written once, in the constructor, and an options value
is typed, hashable (a model config is a static argument of jit) and checked for unknown names.

Example:
  >>> spec = layer_spec("window")
  >>> spec.layer.__name__, spec.options(window=16)
  ('SlidingWindowAttention', SlidingWindowAttentionOptions(window=16, rotary_base=10000.0, short_conv=0, segment_length='auto', sequence_axis=None))
  >>> spec.parse_options({"window": 8}).changed()
  {'window': 8}
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

from flax import nnx

from dca_jax.nn._layer import AttentionLayer
from dca_jax.nn.dca import DCAttention
from dca_jax.nn.deltanet import GatedDeltaNet
from dca_jax.nn.linear import GatedLinearAttention, LinearAttention
from dca_jax.nn.softmax import SoftmaxAttention
from dca_jax.nn.window import SlidingWindowAttention

# Constructor arguments every layer shares; the rest of the keyword arguments are its options.
_SHARED = frozenset({"self", "d_model", "num_heads", "rngs", "dtype", "param_dtype"})


class LayerOptions:
  """Base of the options dataclasses: the layer keyword arguments that differ from defaults."""

  def changed(self) -> dict[str, Any]:
    """The options whose value differs from the constructor's default, as keyword arguments."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default}

  def kwargs(self) -> dict[str, Any]:
    """Every option as keyword arguments of the layer."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _options_type(layer: type[AttentionLayer]) -> type[LayerOptions]:
  """A frozen dataclass whose fields are `layer`'s own keyword arguments, with their defaults."""
  fields = []
  for p in inspect.signature(layer.__init__).parameters.values():
    if p.name in _SHARED or p.kind is not inspect.Parameter.KEYWORD_ONLY:
      continue
    if p.default is inspect.Parameter.empty:
      raise TypeError(f"{layer.__name__} option {p.name!r} needs a default to be registered.")
    fields.append((p.name, p.annotation, dataclasses.field(default=p.default)))
  return dataclasses.make_dataclass(f"{layer.__name__}Options", fields, bases=(LayerOptions,),
                                    frozen=True)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One registered attention layer.

  Attributes:
    name: the registry key (e.g. "dca").
    layer: the `AttentionLayer` subclass.
    options: its options dataclass (fields = the layer's own keyword arguments).
  """

  name: str
  layer: type[AttentionLayer]
  options: type[LayerOptions]

  def parse_options(self, options: Any = None) -> LayerOptions:
    """An options value from None, an options instance, a mapping or (name, value) pairs.

    Raises:
      TypeError: an option name this layer does not have (the message lists the valid ones).
      ValueError: options that are not a mapping of names, or an unhashable value.
    """
    if options is None:
      return self.options()
    if isinstance(options, self.options):
      return options
    if isinstance(options, LayerOptions):
      raise TypeError(f"attention_options of {type(options).__name__} do not fit attention "
                      f"{self.name!r}: expected {self.options.__name__}.")
    original = options
    if isinstance(options, Mapping):
      options = options.items()
    try:
      pairs = [(k, v) for k, v in options]
    except (TypeError, ValueError) as e:
      raise ValueError(f"attention_options must be a mapping from option names to values or a "
                       f"sequence of (name, value) pairs, got {original!r}.") from e
    names = [k for k, _ in pairs]
    if any(not isinstance(k, str) for k in names) or len(set(names)) != len(names):
      raise ValueError(f"attention_options names must be distinct strings, got {original!r}.")
    valid = [f.name for f in dataclasses.fields(self.options)]
    unknown = sorted(set(names) - set(valid))
    if unknown:
      raise TypeError(f"attention {self.name!r} ({self.layer.__name__}) has no option "
                      f"{', '.join(map(repr, unknown))}; its options are {valid}.")
    value = self.options(**dict(pairs))
    try:
      # A model config is a static attribute of the model: jit hashes it with the graph.
      hash(value)
    except TypeError as e:
      raise ValueError(f"attention_options values must be hashable (use tuples, not lists), got "
                       f"{original!r}.") from e
    return value

  def build(self, d_model: int, num_heads: int, options: Any = None, *, rngs: nnx.Rngs,
            dtype: Any = None, param_dtype: Any = None) -> AttentionLayer:
    """The layer with `options` (see `parse_options`); param_dtype None keeps the default."""
    extra = {} if param_dtype is None else {"param_dtype": param_dtype}
    return self.layer(d_model, num_heads, rngs=rngs, dtype=dtype, **extra,
                      **self.parse_options(options).changed())


def _spec(name: str, layer: type[AttentionLayer]) -> LayerSpec:
  return LayerSpec(name, layer, _options_type(layer))


LAYERS: Mapping[str, LayerSpec] = {spec.name: spec for spec in (
    _spec("dca", DCAttention),
    _spec("softmax", SoftmaxAttention),
    _spec("window", SlidingWindowAttention),
    _spec("linear", LinearAttention),
    _spec("gla", GatedLinearAttention),
    _spec("gated_deltanet", GatedDeltaNet),
)}

ATTENTION_TYPES: tuple[str, ...] = tuple(LAYERS)

# Parameter names that weight decay must leave alone in any registered layer: learned rates and
# their projections (pulling a decay rate's weights to zero changes the memory's time scale,
# not its capacity). Each layer declares its own in `no_weight_decay`.
NO_WEIGHT_DECAY: frozenset[str] = frozenset().union(
    *(spec.layer.no_weight_decay for spec in LAYERS.values()))


def layer_spec(name: str) -> LayerSpec:
  """The `LayerSpec` registered under `name`.

  Raises:
    ValueError: an unknown name (the message lists the registered ones).
  """
  try:
    return LAYERS[name]
  except (KeyError, TypeError):
    raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {name!r}.") from None
