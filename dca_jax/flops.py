"""Exact FLOP counts of JAX functions, by walking their jaxpr.

XLA's cost analysis (`jax.jit(f).lower(...).compile().cost_analysis()`) counts the body of a loop
once, whatever its trip count, so the FLOPs of a `jax.lax.scan` form come out `T` times too small
and cannot show how a form grows with the sequence length. This module counts the jaxpr instead:
a `scan` body is counted `length` times, a `cond` costs its dearest branch, and call-like
primitives (`jit`, `remat2`, `custom_jvp_call`, ...) are counted through.

Counting rules (per equation; "elements" are those of the output unless said otherwise):

* `dot_general`: 2 * batch * M * N * K, i.e. 2 * output elements * contracted size.
  `conv_general_dilated`: 2 * output elements * kernel spatial size * in_features / groups,
  counting every tap, padded ones included (XLA skips taps that fall in the padding, so it
  reports less for `SAME` padding; `VALID` convolutions agree exactly).
* Elementwise arithmetic, comparisons, `select_n` and `clamp`: 1 per element, whatever the
  dtype (integer and boolean ops count too, as in XLA; a loop counter adds 1 per iteration).
  `integer_pow` with exponent `y` costs the multiplies of binary exponentiation (plus one
  reciprocal when `y < 0`), which is how JAX lowers it and what XLA reports: `x**3` costs 2.
* Transcendentals (`exp`, `log`, `tanh`, `logistic`, `sin`, `erf`, `pow`, `sqrt`, `rsqrt`, ...):
  1 per element, counted in both `transcendentals` and `flops`. XLA instead reports them apart
  from its `flops` and expands a few (`logistic` is 3 flops + 1 transcendental there).
* Reductions (`reduce_sum`, `reduce_max`, `argmax`, ...): 1 per input element (XLA counts n - 1
  per output). Cumulative ops (`cumsum`, `cumlogsumexp`, ...): 1 per element. `reduce_window_*`:
  window size per output element. `sort`: n * ceil(log2(d)) comparisons along a dimension of
  size d, an estimate.
* Data movement (reshape, transpose, slice, gather, scatter, concatenate, pad, convert, iota,
  ...): 0. `scatter-add` and its siblings: 1 per update element.
* `scan`: body * `length`. `while`: (body + cond) * trips + cond when the trip count is static
  (the `fori_loop` pattern: a counter stepped by 1 from a literal start to a literal bound);
  otherwise `ValueError`. `fori_loop` with Python-int bounds lowers to `scan`; with concrete
  array bounds (closed over, or given to `count_flops` as keyword arguments) to a `while` with
  literal bounds; bounds passed positionally to `count_flops` are traced, hence unknown.
  The blocked softmax (`dca_jax.ops.blocked_softmax`) skips key blocks with such loops; it
  unrolls them while `count_flops` traces (`counting()`), unless the caller's own `jax.jit`
  cached a trace of it earlier (then the count can raise the `ValueError` below).
  `cond`: the branch with the most FLOPs.
* Any other primitive holding jaxprs in its params is counted through them; one without costs
  1 per output element, so an unknown primitive never makes counting fail (linear-algebra
  decompositions such as `cholesky` are undercounted this way).

Equations whose outputs are never used are dropped first, as XLA would (the jaxpr of `jax.grad`
keeps some). Complex arithmetic counts as real (1 per element), and a `shard_map` body is
counted once, i.e. per shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

_LOG = logging.getLogger(__name__)

__all__ = ["FlopCount", "count_flops", "count_jaxpr"]

# True while `count_flops` traces. A form whose loops have data-dependent trip counts (the
# blocked softmax skips the key blocks above the diagonal) reads it at trace time and unrolls
# those loops in Python instead, so that every trip count is static and can be counted. The
# unrolled trace does the same arithmetic per block; only the loop structure differs.
_COUNTING = contextvars.ContextVar("dca_jax_flops_counting", default=False)


def counting() -> bool:
  """Whether `count_flops` is tracing the caller (see `_COUNTING`)."""
  return _COUNTING.get()


@contextlib.contextmanager
def _counting_mode():
  token = _COUNTING.set(True)
  try:
    yield
  finally:
    _COUNTING.reset(token)


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of a computation.

  Attributes:
    flops: Total floating point operations, matmuls and transcendentals included.
    matmul_flops: The part of `flops` spent in `dot_general` and `conv_general_dilated`.
    transcendentals: Transcendental evaluations (`exp`, `tanh`, `sqrt`, ...), also in `flops`.

  Example:
    >>> FlopCount(10, 8, 1) * 3 + FlopCount(1, 0, 0)
    FlopCount(flops=31, matmul_flops=24, transcendentals=3)
  """

  flops: int = 0
  matmul_flops: int = 0
  transcendentals: int = 0

  def __add__(self, other: FlopCount) -> FlopCount:
    if not isinstance(other, FlopCount):
      return NotImplemented
    return FlopCount(
        self.flops + other.flops,
        self.matmul_flops + other.matmul_flops,
        self.transcendentals + other.transcendentals,
    )

  def __radd__(self, other: Any) -> FlopCount:
    # Lets `sum(counts)` start from its default 0.
    if isinstance(other, numbers.Integral) and other == 0:
      return self
    return NotImplemented

  def __mul__(self, times: int) -> FlopCount:
    if isinstance(times, bool) or not isinstance(times, numbers.Integral):
      return NotImplemented
    times = int(times)
    return FlopCount(self.flops * times, self.matmul_flops * times, self.transcendentals * times)

  __rmul__ = __mul__


_ZERO = FlopCount()

# Only move, copy or relabel data. Kept explicit: anything not listed here is charged.
_DATA_MOVEMENT = frozenset({
    "reshape", "broadcast_in_dim", "broadcast_to", "transpose", "squeeze", "expand_dims", "rev",
    "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "split", "tile",
    "stack", "unstack", "gather", "scatter", "convert_element_type", "bitcast_convert_type",
    "iota", "iota_2x32_shape", "copy", "copy_p", "real", "imag", "complex", "stop_gradient",
    "zeros_like", "empty", "empty2", "device_put", "sharding_constraint", "layout_constraint",
    "reshard", "mesh_cast", "pvary",
    "optimization_barrier", "with_memory_space_constraint", "inspect_sharding", "pin", "unpin",
    "random_wrap", "random_unwrap", "random_seed", "create_token", "after_all", "debug_callback",
    "debug_print", "name", "dce_sink", "axis_index", "dimension_size", "shape_assertion",
    "platform_index", "all_gather", "all_to_all", "ppermute",
})

# Charged 1 per output element. Listed so that new primitives show up in the debug log.
_ELEMENTWISE = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "floor",
    "ceil", "round", "square", "nextafter", "is_finite", "select_n", "clamp", "eq", "ne", "lt",
    "le", "gt", "ge", "and", "or", "not", "xor", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "population_count", "clz", "conj", "mulhi", "reduce_precision",
    "psum", "pmax", "pmin",
})

_TRANSCENDENTAL = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
    "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv",
    "pow", "sqrt", "rsqrt", "cbrt", "lgamma", "digamma", "polygamma", "zeta", "igamma", "igammac",
    "igamma_grad_a", "random_gamma_grad", "bessel_i0e", "bessel_i1e",
    "regularized_incomplete_beta",
})

# Charged 1 per input element.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin",
})

# Charged 1 per (output) element, like elementwise ops; named so the rule is visible.
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})

_SCATTER_COMBINE = frozenset({"scatter-add", "scatter-sub", "scatter-mul", "scatter-min",
                              "scatter-max", "scatter_add", "scatter_mul", "scatter_min",
                              "scatter_max"})

_REDUCE_WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
  """Counts the FLOPs of `fn(*args, **kwargs)` exactly, loops included.

  `fn` is traced with `jax.make_jaxpr`; nothing runs. Positional arguments are traced (arrays,
  `jax.ShapeDtypeStruct`s or pytrees of them); keyword arguments are bound with
  `functools.partial`, so static options (ints, flags) go there.

  Args:
    fn: Any JAX-traceable function, e.g. a form of attention or `jax.grad(loss)`.
    *args: Arguments to trace `fn` with; only shapes and dtypes matter.
    **kwargs: Static keyword arguments passed through to `fn`.

  Returns:
    The `FlopCount` of one call.

  Raises:
    ValueError: If `fn` contains a `while_loop` whose trip count is not static.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    >>> w = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    >>> count_flops(lambda x, w: x @ w, x, w).flops  # 2 * 4 * 16 * 8
    1024
  """
  traced = functools.partial(fn, **kwargs) if kwargs else fn
  with _counting_mode():
    jaxpr = jax.make_jaxpr(traced)(*args)
  return count_jaxpr(jaxpr)


def count_jaxpr(jaxpr: jex_core.ClosedJaxpr | jex_core.Jaxpr) -> FlopCount:
  """Counts the FLOPs of a jaxpr (see the module docstring for the rules).

  Args:
    jaxpr: A `ClosedJaxpr` (as returned by `jax.make_jaxpr`) or a `Jaxpr`.

  Returns:
    The `FlopCount` of one evaluation, all outputs used.

  Raises:
    TypeError: If `jaxpr` is neither a `ClosedJaxpr` nor a `Jaxpr`.
    ValueError: If it contains a `while` loop whose trip count is not static.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> count_jaxpr(jax.make_jaxpr(jnp.tanh)(jnp.ones(3)))
    FlopCount(flops=3, matmul_flops=0, transcendentals=3)
  """
  if not isinstance(jaxpr, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
    raise TypeError(f"jaxpr must be a ClosedJaxpr or a Jaxpr, got {type(jaxpr).__name__}.")
  return _count(jaxpr)


def _open(jaxpr: Any) -> jex_core.Jaxpr:
  return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _count(jaxpr: Any, used_outputs: Sequence[bool] | None = None) -> FlopCount:
  """Counts the live equations of `jaxpr` given which of its outputs are used."""
  total = _ZERO
  for eqn, used in _live_eqns(_open(jaxpr), used_outputs):
    total += _count_eqn(eqn, used)
  return total


def _live_eqns(jaxpr: jex_core.Jaxpr, used_outputs: Sequence[bool] | None):
  """Returns `(eqn, used_outputs)` for the equations that feed a used output, in order.

  Dead code must go before counting: `make_jaxpr(jax.grad(f))` keeps forward values that the
  backward pass never reads, and XLA would delete them.
  """
  if used_outputs is None:
    used_outputs = [True] * len(jaxpr.outvars)
  live = {v for v, used in zip(jaxpr.outvars, used_outputs) if used and _is_var(v)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    used = [_is_var(v) and v in live for v in eqn.outvars]
    if not any(used) and not eqn.effects:
      continue
    kept.append((eqn, used))
    live.update(v for v in eqn.invars if _is_var(v))
  kept.reverse()
  return kept


def _is_var(v: Any) -> bool:
  return not isinstance(v, (jex_core.Literal, jex_core.DropVar))


def _size(aval: Any) -> int:
  shape = getattr(aval, "shape", None)
  if shape is None:
    return 0  # Tokens, refs and other non-arrays hold no arithmetic.
  try:
    return int(math.prod(int(d) for d in shape))
  except (TypeError, ValueError):  # Symbolic dimensions: nothing exact to say.
    return 0


def _out_size(eqn: Any) -> int:
  return sum(_size(v.aval) for v in eqn.outvars)


def _in_size(eqn: Any, i: int = 0) -> int:
  return _size(eqn.invars[i].aval) if len(eqn.invars) > i else 0


def _count_eqn(eqn: Any, used: Sequence[bool]) -> FlopCount:
  """Counts one equation; falls back to 1 per output element when its rule cannot apply."""
  try:
    return _apply_rule(eqn, used)
  except (KeyError, AttributeError, TypeError, IndexError) as e:
    # Params differ between jax versions; a count that is slightly off beats a crash.
    _LOG.debug("dca_jax.flops: rule for %r failed (%r), counted per element.", eqn.primitive, e)
    return FlopCount(_out_size(eqn), 0, 0)


def _apply_rule(eqn: Any, used: Sequence[bool]) -> FlopCount:
  name = eqn.primitive.name
  params = eqn.params
  if name in _DATA_MOVEMENT:
    return _ZERO
  if name == "dot_general":
    (lhs_contract, _), _ = params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    k = math.prod(int(lhs_shape[d]) for d in lhs_contract)
    n = 2 * _out_size(eqn) * k
    return FlopCount(n, n, 0)
  if name == "conv_general_dilated":
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = params["dimension_numbers"].rhs_spec[0]
    # The kernel's in-feature dim already holds in_features / feature_group_count.
    taps = math.prod(int(d) for d in rhs_shape) // int(rhs_shape[out_feature_dim])
    n = 2 * _out_size(eqn) * taps
    return FlopCount(n, n, 0)
  if name in _TRANSCENDENTAL:
    n = _out_size(eqn)
    return FlopCount(n, 0, n)
  if name == "integer_pow":
    return FlopCount(_out_size(eqn) * _integer_pow_cost(int(params["y"])), 0, 0)
  if name in _REDUCTIONS:
    return FlopCount(_in_size(eqn), 0, 0)
  if name in _CUMULATIVE:
    return FlopCount(_out_size(eqn), 0, 0)
  if name in _SCATTER_COMBINE:
    return FlopCount(_in_size(eqn, 2), 0, 0)  # Operands: operand, indices, updates.
  if name in _REDUCE_WINDOW:
    window = math.prod(params["window_dimensions"])
    return FlopCount(_out_size(eqn) * window, 0, 0)
  if name == "reduce_window":
    window = math.prod(params["window_dimensions"])
    return _count(params["jaxpr"]) * (_size(eqn.outvars[0].aval) * window)
  if name == "reduce":
    # `jaxpr` combines one element of each operand into the accumulator.
    return _count(params["jaxpr"]) * _in_size(eqn)
  if name == "sort":
    dim = int(eqn.invars[0].aval.shape[params["dimension"]])
    return FlopCount(_in_size(eqn) * max(1, math.ceil(math.log2(max(dim, 2)))), 0, 0)
  if name == "scan":
    n_carry = params["num_carry"]
    body_used = [True] * n_carry + list(used[n_carry:])  # Carries feed the next step.
    return _count(params["jaxpr"], body_used) * int(params["length"])
  if name == "while":
    return _count_while(eqn)
  if name == "cond":
    branches = [_count(b, used) for b in params["branches"]]
    return max(branches, key=lambda c: (c.flops, c.matmul_flops, c.transcendentals))
  if name == "custom_linear_solve":
    solve = getattr(params.get("jaxprs"), "solve", None)
    if solve is not None:
      return _count(solve)
  subs = _sub_jaxprs(params)
  if subs:
    # Call-like primitives (jit/pjit, closed_call, remat2, custom_jvp_call, custom_vjp_call,
    # ...) map their outputs one to one onto the inner jaxpr's, so liveness carries over.
    total = _ZERO
    for sub in subs:
      inner_used = used if len(_open(sub).outvars) == len(used) else None
      total += _count(sub, inner_used)
    return total
  if name not in _ELEMENTWISE:
    _LOG.debug("dca_jax.flops: no rule for primitive %r, counted 1 per output element.", name)
  return FlopCount(_out_size(eqn), 0, 0)


def _integer_pow_cost(y: int) -> int:
  """Multiplies of binary exponentiation for `x**y`, plus one reciprocal when `y < 0`."""
  m = abs(y)
  if m == 0:
    return 0
  muls = (m.bit_length() - 1) + (bin(m).count("1") - 1)
  return muls + (1 if y < 0 else 0)


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  """All jaxprs held in `params`, also inside tuples and lists (e.g. `cond`'s `branches`)."""
  found = []

  def visit(value: Any) -> None:
    if isinstance(value, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
      found.append(value)
    elif isinstance(value, (tuple, list)):
      for item in value:
        visit(item)

  for value in params.values():
    visit(value)
  return found


def _count_while(eqn: Any) -> FlopCount:
  """Counts a `while` whose trip count is static; raises `ValueError` otherwise."""
  params = eqn.params
  trips = _while_trip_count(eqn)
  if trips is None:
    raise ValueError(
        "count_flops cannot count a while_loop whose trip count is not known at trace time. "
        "Only the fori_loop pattern (a counter stepped by 1 from a literal start to a literal "
        "bound) is recognised. Use jax.lax.scan, or jax.lax.fori_loop with Python-int bounds "
        "(which lowers to scan).")
  body = _count(params["body_jaxpr"])
  cond = _count(params["cond_jaxpr"])
  return body * trips + cond * (trips + 1)


def _literal_int(v: Any) -> int | None:
  if not isinstance(v, jex_core.Literal):
    return None
  value = np.asarray(v.val)
  if value.shape or not np.issubdtype(value.dtype, np.integer):
    return None
  return int(value)


def _while_trip_count(eqn: Any) -> int | None:
  """Trip count of a `while` built like `fori_loop`, or None when it cannot be read off.

  Recognised: `cond` is the single comparison `i < upper`; the body returns `i + 1` in the
  counter's slot; the counter starts at a literal; `upper` is a literal, a literal cond const,
  or a carry the body passes through unchanged with a literal start.
  """
  params = eqn.params
  cond = _open(params["cond_jaxpr"])
  body = _open(params["body_jaxpr"])
  cn, bn = params["cond_nconsts"], params["body_nconsts"]
  inits = eqn.invars[cn + bn:]
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
    return None
  if cond.outvars[0] is not cond.eqns[0].outvars[0]:
    return None
  counter, upper = cond.eqns[0].invars
  cond_carry = list(cond.invars[cn:])
  if counter not in cond_carry:
    return None
  i = cond_carry.index(counter)
  lower = _literal_int(inits[i])
  if lower is None or not _steps_by_one(body, bn, i):
    return None
  if isinstance(upper, jex_core.Literal):
    bound = _literal_int(upper)
  elif upper in cond.invars[:cn]:
    bound = _literal_int(eqn.invars[list(cond.invars[:cn]).index(upper)])
  elif upper in cond_carry:
    j = cond_carry.index(upper)
    passes_through = body.outvars[j] is body.invars[bn + j]
    bound = _literal_int(inits[j]) if passes_through else None
  else:
    bound = None
  if bound is None:
    return None
  return max(0, bound - lower)


def _steps_by_one(body: jex_core.Jaxpr, bn: int, i: int) -> bool:
  """True when the body's output `i` is its carry input `i` plus the literal 1."""
  counter_in, counter_out = body.invars[bn + i], body.outvars[i]
  for eqn in body.eqns:
    if counter_out in eqn.outvars:
      if eqn.primitive.name != "add" or len(eqn.invars) != 2:
        return False
      a, b = eqn.invars
      return ((a is counter_in and _literal_int(b) == 1)
              or (b is counter_in and _literal_int(a) == 1))
  return False
