"""Rotary position embeddings (RoPE): positions enter attention only through their differences.

Each pair of channels (x_i, x_{i+K/2}) of a query or key is rotated by the angle p * f_i, where p
is the token's position and f_i = base^(-2i/K). A rotation is orthogonal, so norms are kept, and
the dot product of a query rotated at p with a key rotated at s depends on p and s only through
p - s. That is why keys can be rotated once, at their absolute position, and stored in a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax.ops import _checks


def rotary_frequencies(dim: int, base: float = 10000.0) -> jax.Array:
  """Angular frequencies f_i = base^(-2i/dim), i = 0..dim/2-1, of rotary embeddings.

  Args:
    dim: K, the (even) number of channels rotated; there is one frequency per pair.
    base: the wavelength scale; the slowest pair turns once every ~2 pi base tokens.

  Returns:
    [dim // 2] float32, from 1 down to base^(-(dim-2)/dim).

  Raises:
    ValueError: `dim` is not an even integer >= 2, or `base` is not > 0.

  Example:
    >>> rotary_frequencies(4, 100.0)
    Array([1. , 0.1], dtype=float32)

  References:
    Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. (15).
  """
  _checks.check_positive_int("dim", dim)
  if dim % 2:
    raise ValueError(f"dim must be even (channels are rotated in pairs), got {dim}.")
  if not base > 0:
    raise ValueError(f"base must be > 0, got {base!r}.")
  # Computed in float64 by NumPy (dim and base are static) and rounded once, so every caller
  # agrees on the exact float32 frequencies.
  return jnp.asarray(frequencies_numpy(dim, base))


def frequencies_numpy(dim: int, base: float) -> np.ndarray:
  """`rotary_frequencies` as a NumPy float32 array, unchecked (for tables built at trace time)."""
  return (float(base) ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  r"""Rotates queries or keys by their positions (rotary embeddings, half-split convention).

  With K channels, m = K/2, f_i = `rotary_frequencies(K, base)` and p the position of the token,
  channel i is paired with channel i + m (the "half-split" layout of GPT-NeoX and LLaMA):

      y_i     = x_i cos(p f_i) - x_{i+m} sin(p f_i)
      y_{i+m} = x_{i+m} cos(p f_i) + x_i sin(p f_i),        i = 0..m-1.

  Hence |y| = |x| and rot(q, p) . rot(k, s) = q . rot(k, s - p): scores depend on p - s only.

  Shapes (B batch, T time, H heads, K key dim): x [..., T, H, K]; positions [..., T], whose
  leading dims broadcast against x's (e.g. [T] for every batch row alike, or [B, T]).

  Numerics: angles, cos, sin and the rotation run in float32 whatever x's dtype, and the result
  is cast back to x's dtype. A float32 angle p * f carries an absolute error of about
  p * f * 2^-24 radians, so at position 1e6 the fastest pair (f = 1) is off by ~0.06 rad; the
  slower pairs, which carry long-range position, are proportionally more accurate. Integer
  positions are exact in float32 up to 2^24.

  Args:
    x: [..., T, H, K] floating, K even.
    positions: [..., T] integer or floating positions. A NumPy array (positions known when
      tracing, e.g. `np.arange(T)`) makes cos and sin constants of the compiled program, up to
      `STATIC_TABLE_MAX` entries.
    base: rotary base (see `rotary_frequencies`).

  Returns:
    [..., T, H, K] in x's dtype, the same shape as x.

  Raises:
    TypeError: x is not a floating array, or positions is neither integer nor floating.
    ValueError: x has rank < 3 or an odd K, positions' last dim is not T, or positions' leading
      dims do not broadcast to x's.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    >>> apply_rotary(x, jnp.arange(5)).shape
    (2, 5, 3, 8)

  References:
    Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", sec. 3.4.
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"x must be an array, got {type(x).__name__}.")
  if x.ndim < 3:
    raise ValueError(f"x must have shape [..., T, H, K] (rank >= 3), got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must have a floating dtype, got {x.dtype}.")
  time, key_dim = x.shape[-3], x.shape[-1]
  if key_dim % 2:
    raise ValueError(
        f"x must have an even last dim K (channels are rotated in pairs), got K = {key_dim} "
        f"(shape {tuple(x.shape)}).")
  if not hasattr(positions, "shape") or not hasattr(positions, "dtype"):
    positions = jnp.asarray(positions)
  if not (jnp.issubdtype(positions.dtype, jnp.integer) or jnp.issubdtype(positions.dtype, jnp.floating)):
    raise TypeError(f"positions must have an integer or floating dtype, got {positions.dtype}.")
  if positions.ndim < 1 or positions.shape[-1] != time:
    raise ValueError(
        f"positions must have shape [..., T] with T = {time} (from x of shape {tuple(x.shape)}), "
        f"got shape {tuple(positions.shape)}.")
  lead = x.shape[:-3]
  try:
    broadcast = jnp.broadcast_shapes(positions.shape[:-1], lead)
  except ValueError:
    broadcast = None
  if broadcast != tuple(lead):
    raise ValueError(
        f"positions' leading dims {tuple(positions.shape[:-1])} must broadcast to x's leading dims "
        f"{tuple(lead)} (x shape {tuple(x.shape)}).")

  if isinstance(positions, np.ndarray) and positions.size * key_dim // 2 <= STATIC_TABLE_MAX:
    # Positions known when tracing: cos and sin are constants of the program. Computed inside
    # it, XLA:CPU fuses them into the rotation and recomputes them for every head and both
    # halves of each pair.
    cos, sin = static_tables(positions, key_dim, base)
    return rotate_pairs(x, jnp.asarray(cos), jnp.asarray(sin)).astype(x.dtype)
  freqs = rotary_frequencies(key_dim, base)                        # [K/2]
  angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [..., T, 1, K/2]
  return rotate_pairs(x, jnp.cos(angles), jnp.sin(angles)).astype(x.dtype)


# The largest static cos (and sin) table `apply_rotary` builds, in entries (4 MiB of float32
# each): beyond it the angles are computed in the program.
STATIC_TABLE_MAX = 1 << 20


def static_tables(positions: np.ndarray, key_dim: int, base: float):
  """cos and sin [..., T, 1, K/2] float32 of NumPy positions: the float32 angle p * f_i that
  `apply_rotary` forms in the program, its cos and sin taken in float64 and rounded once
  (constants of a program; also the window op's in-block tables)."""
  angles = positions.astype(np.float32)[..., None, None] * frequencies_numpy(key_dim, base)
  angles = angles.astype(np.float64)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_phase(positions: jax.Array, dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles p * f_i, reduced modulo 2 pi exactly, for integer p.

  Each angle is a 32-bit fixed-point phase: p * round(2^32 f_i / (2 pi)) in uint32 arithmetic,
  which wraps modulo 2^32, i.e. modulo one turn. The difference of two phases is therefore
  exact, whatever the positions: a key rotated at j and a query rotated at t meet at the
  relative angle (t - j) f_i up to |t - j| * 7.3e-10 rad (the rounding of f_i to 2^-32 turn)
  plus ~4e-7 rad (the float32 cos/sin), where float32 angles lose ~p f 2^-24 rad at position p.
  Decoding states store their keys rotated this way (`DCAState`), so a step rotates one query
  instead of every buffered key. Negative positions wrap as well (a rotation backwards).

  Args:
    positions: integer array [...], absolute positions (int32; negative ones rotate back).
    dim: K, the even number of rotated channels.
    base: rotary base (as `rotary_frequencies`).

  Returns:
    (cos, sin), each [..., K/2] float32.

  Example:
    >>> import jax.numpy as jnp
    >>> cos, sin = rotary_phase(jnp.array([0, 1]), 4, 100.0)
    >>> cos.shape
    (2, 2)
  """
  _checks.check_positive_int("dim", dim)
  if dim % 2:
    raise ValueError(f"dim must be even (channels are rotated in pairs), got {dim}.")
  if not base > 0:
    raise ValueError(f"base must be > 0, got {base!r}.")
  freqs = float(base) ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  turns = np.round((freqs / (2.0 * np.pi)) % 1.0 * 2.0 ** 32).astype(np.int64) % 2 ** 32
  # The same residues as signed int32 (two's complement): int32 products wrap modulo 2^32 in
  # XLA (and in ONNX Runtime, which has no unsigned Mul on every build), and a signed phase
  # maps to an angle in [-pi, pi).
  step = jnp.asarray(np.where(turns >= 2 ** 31, turns - 2 ** 32, turns).astype(np.int32))
  phase = jnp.asarray(positions).astype(jnp.int32)[..., None] * step    # modulo 2^32: one turn
  angles = phase.astype(jnp.float32) * np.float32(2.0 * np.pi / 2.0 ** 32)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the half-split channel pairs (x_i, x_{i+K/2}) of x [..., K] by the angles whose
  cos, sin [..., K/2] are given (broadcast against x's leading dims); float32 result."""
  half = x.shape[-1] // 2
  x = x.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
