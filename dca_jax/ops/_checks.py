"""Input checks shared by the public functions of `dca_jax.ops`.

Every public op validates its arguments here, at the boundary, so that a bad call fails with a
message naming the argument, the expected value and the received one, instead of deep inside XLA.
Inside the ops the data is trusted.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when `x` holds values we can inspect now (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_array(name: str, x: Any, ndim: int | Sequence[int], *, floating: bool = True) -> None:
  """Checks that `x` is an array of the given rank(s) (and a floating dtype when asked)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
  ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if x.ndim not in ranks:
    expected = " or ".join(str(r) for r in ranks)
    raise ValueError(f"{name} must have rank {expected}, got rank {x.ndim} with shape {tuple(x.shape)}.")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")


def check_dim(name: str, x: Any, axis: int, expected: int, what: str) -> None:
  """Checks one dimension of `x` against the value fixed by another argument."""
  got = x.shape[axis]
  if got != expected:
    raise ValueError(f"{name} has {what} = {got} (shape {tuple(x.shape)}), expected {expected}.")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
  """Checks that `value` is a Python int >= 1 (or None when allowed)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def check_reset(reset: Any, batch: int, time: int) -> None:
  """Checks an optional reset mask of shape [B, T] and boolean dtype."""
  if reset is None:
    return
  if not hasattr(reset, "shape"):
    raise TypeError(f"reset must be a boolean array of shape [B, T] or None, got {type(reset).__name__}.")
  if tuple(reset.shape) != (batch, time):
    raise ValueError(f"reset must have shape [B, T] = {(batch, time)}, got {tuple(reset.shape)}.")
  if reset.dtype != jnp.bool_:
    raise TypeError(f"reset must have dtype bool, got {reset.dtype}.")


def check_step_reset(reset: Any, batch: int) -> None:
  """Checks an optional reset of one decoding step: bool of shape [B]."""
  if reset is None:
    return
  if not hasattr(reset, "shape"):
    raise TypeError(f"reset must be a boolean array of shape [B] or None, got {type(reset).__name__}.")
  if tuple(reset.shape) != (batch,):
    raise ValueError(f"reset must have shape [B] = {(batch,)} (one flag per row), got {tuple(reset.shape)}.")
  if reset.dtype != jnp.bool_:
    raise TypeError(f"reset must have dtype bool, got {reset.dtype}.")


def check_nonpositive(name: str, x: Any) -> None:
  """Checks that a concrete array has no value > 0 (skipped for tracers, where values are unknown)."""
  if not is_concrete(x):
    return
  values = np.asarray(x)
  if values.size and np.nanmax(values) > 0:
    raise ValueError(
        f"{name} must be <= 0 everywhere (it is a log decay), got a maximum of {float(np.nanmax(values))}.")
  if np.isnan(values).any():
    raise ValueError(f"{name} contains NaN.")


def check_unit_interval(name: str, x: Any) -> None:
  """Checks that a concrete array lies in [0, 1] (skipped for tracers, where values are unknown)."""
  if not is_concrete(x):
    return
  values = np.asarray(x, np.float64)
  if np.isnan(values).any():
    raise ValueError(f"{name} contains NaN.")
  if values.size and (values.min() < 0 or values.max() > 1):
    raise ValueError(f"{name} must lie in [0, 1] everywhere, got values from {float(values.min())} "
                     f"to {float(values.max())}.")


def check_flag(name: str, value: Any) -> bool:
  """`value` as a bool if it is a Python or NumPy bool; else a TypeError naming `name` (a traced
  or array value cannot choose which program is built)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a Python bool (True or False), got {value!r} of type "
                    f"{type(value).__name__}.")
  return bool(value)


def parse_choice(choices: type, value: Any, name: str):
  """`choices(value)` for a str-valued Enum, or a ValueError naming `name` and the valid values."""
  try:
    return choices(value)
  except ValueError:
    valid = ", ".join(repr(member.value) for member in choices)
    raise ValueError(f"{name} must be one of {valid}, got {value!r}.") from None


def check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
  """Checks an engine's q, k [B, T, H, K] and v [B, T, H, V] (T >= 1); returns (B, T, H, K, V).

  Raises:
    TypeError / ValueError: naming the argument, the expected and the received shape.
  """
  check_array("q", q, 4)
  batch, time, heads, key_dim = q.shape
  check_array("k", k, 4)
  check_array("v", v, 4)
  for name, x in (("k", k), ("v", v)):
    for axis, what, size in ((0, "batch size B", batch), (1, "length T", time), (2, "heads H", heads)):
      check_dim(name, x, axis, size, what + " (must match q)")
  check_dim("k", k, 3, key_dim, "key dim K (must match q)")
  if time < 1:
    raise ValueError(f"q must have length T >= 1, got T = {time}.")
  return batch, time, heads, key_dim, v.shape[3]


def check_state(name: str, state: Any, expected: tuple[int, int, int, int]) -> None:
  """Checks an optional engine state: None, or a floating [B, H, K, V] array of shape `expected`.

  Raises:
    TypeError / ValueError: naming `name`, the expected and the received shape.
  """
  if state is None:
    return
  check_array(name, state, 4)
  if tuple(state.shape) != expected:
    raise ValueError(f"{name} must have shape [B, H, K, V] = {expected}, got {tuple(state.shape)}.")
